"""The endpoint proxy: clients reach the apps in their VMs, with a token, over HTTP/1.1,
HTTP/2 (TLS and h2c), gRPC, WebSocket and server-sent events (docs/PROXY.md).

- ``admission``: host name → VM, target port, token and ingress checks, connection limits.
- ``h1relay``: HTTP/1.1 on protocol callbacks, every connection's start and the hot path;
  ``h1wire`` parses HTTP/1.1 heads strictly (and copies bodies raw on streams), ``h1body``
  finds where a body ends in bytes as they arrive.
- ``http1`` / ``forced_h2``: the stream-based relays ``h1relay`` hands upgrades and force-h2
  to; ``h2peer`` drives h2c connections to apps (h2 does that framing).
- ``http2``: HTTP/2 from clients on protocol callbacks: ``h2server`` frames it (HPACK from
  ``h2hpack``, request fields checked by ``h2fields``), ``h2toh1`` relays a stream to an
  HTTP/1.1 app (``h1body.Payload`` unframes the answer), ``h2toh2`` to an h2c app (gRPC).
- ``shell``: ``/shell`` WebSockets bridged to a PTY in the VM.
- ``tls``: the local CA and the listener's certificate.
- ``server``: ``EndpointProxy``, the two listeners.
"""

from embervm.proxy.server import EndpointProxy

__all__ = ["EndpointProxy"]
