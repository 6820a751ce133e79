"""The proxy's limits, timeouts and connection-specific field sets that more than one module
reads (both wings, or a wing and the shared modules): one definition each.

A limit that only one module reads stays beside its use: the HTTP/2 frame layer's SETTINGS in
``h2.frames``, the stream-based session's in ``h1.session``, the listeners' in ``server``, the
shell's in ``shell``, the h2c app connections' in ``h2c_upstream``.
"""

from __future__ import annotations

# -- sizes ----------------------------------------------------------------------------------
READ_SIZE = 64 * 1024  # one read from a socket
MAX_HEAD = 64 * 1024  # an HTTP/1.1 head (request or answer), CR LF CR LF included

# -- timeouts (seconds) ---------------------------------------------------------------------
CONNECT_TIMEOUT = 10.0  # to open a connection to an app
FIRST_REQUEST_TIMEOUT = 30.0  # a new connection's first request (HTTP/2: with a valid token)
KEEPALIVE_TIMEOUT = 120.0  # between requests (HTTP/2: without a stream) before closing
BODY_IDLE_TIMEOUT = 300.0  # without a byte either way during an exchange (HTTP/2: a stream)
SESSION_IDLE_TIMEOUT = 600.0  # a spliced session without a byte either way (the default)
TOKEN_CHECK_INTERVAL = 5.0  # how often a spliced session asks whether its token is still good

# -- connection-specific fields -------------------------------------------------------------
# Connection-specific fields (RFC 9110 §7.6.1, §11.7): they describe one hop, never the app's
# message, so no path relays them (the HTTP/2 paths add ``host`` and ``http2-settings``). The
# HTTP/1.1 relay states the framing again itself (``h1.wire.forwarded_fields``).
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection",
                        b"proxy-authenticate", b"proxy-authorization", b"te",
                        b"transfer-encoding", b"upgrade"})  # fmt: skip
# The HTTP/2 paths drop two more (RFC 9113 §8.2.2): Host travels as ``:authority`` and
# HTTP2-Settings belongs to h2c's Upgrade.
HOP_BY_HOP_H2 = HOP_BY_HOP | {b"host", b"http2-settings"}
# The ones whose presence makes an HTTP/2 request malformed (RFC 9113 §8.2.2; ``te`` is checked
# on its own: ``trailers`` is allowed), checked by ``h2.fields``.
CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
