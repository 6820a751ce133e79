"""The endpoint proxy: clients reach the apps in their VMs, with a token, over HTTP/1.1,
HTTP/2 (TLS and h2c), gRPC, WebSocket and server-sent events (docs/PROXY.md).

Two wings, named after the protocol the client speaks; in each, ``relay_h1`` relays to an
HTTP/1.1 app and ``relay_h2`` to an h2c app:

- ``h1``: ``relay_h1`` is HTTP/1.1 on protocol callbacks, every connection's start and the hot
  path; ``session`` the stream-based session it hands upgrades, ``/shell`` and force-h2 to;
  ``relay_h2`` a force-h2 request sent as h2c; ``wire`` parses HTTP/1.1 heads strictly (and
  copies bodies raw on streams), ``body`` finds where a body ends in bytes as they arrive.
- ``h2``: ``session`` is HTTP/2 from clients on protocol callbacks; ``frame_layer`` frames it
  (``frames`` its vocabulary, ``send`` its sending half, HPACK from ``hpack``, request fields
  checked by ``fields``); ``relay_h1`` relays a stream to an HTTP/1.1 app (``h1.body.Payload``
  unframes the answer), ``relay_h2`` to an h2c app (gRPC).

Shared by both: ``server`` (``EndpointProxy``, the two listeners, the choice of wing),
``admission`` (host name → VM, target port, token and ingress checks, connection limits),
``shell`` (``/shell`` WebSockets bridged to a PTY in the VM), ``upstream`` (how every app
connection is opened: straight to the guest on this machine, or through the tunnel of the host
that runs the VM in a fleet, resolving the VM once more when that host says it is not there),
``h2c_upstream`` (h2c connections to apps, h2 doing that framing), ``limits`` (the limits,
timeouts and connection-specific field sets more than one module reads), ``streams`` (byte
plumbing), ``tls`` (the local CA and the listener's certificate).
"""

from embervm.proxy.server import EndpointProxy

__all__ = ["EndpointProxy"]
