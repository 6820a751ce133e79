"""The endpoint proxy: clients reach the apps in their VMs, with a token, over HTTP/1.1,
HTTP/2 (TLS and h2c), gRPC, WebSocket and server-sent events (docs/PROXY.md).

- ``admission``: host name → VM, target port, token and ingress checks, connection limits.
- ``h1relay``: HTTP/1.1 on protocol callbacks, every connection's start and the hot path;
  ``h1wire`` parses HTTP/1.1 heads strictly (and copies bodies raw on streams), ``h1body``
  finds where a body ends in bytes as they arrive.
- ``http1`` / ``http2`` / ``forced_h2``: the stream-based relays ``h1relay`` hands upgrades,
  force-h2 and HTTP/2 to; ``h2peer`` drives h2 connections (h2 does that framing).
- ``shell``: ``/shell`` WebSockets bridged to a PTY in the VM.
- ``tls``: the local CA and the listener's certificate.
- ``server``: ``EndpointProxy``, the two listeners.
"""

from embervm.proxy.server import EndpointProxy

__all__ = ["EndpointProxy"]
