"""What the endpoints speak on the wire, spelled once (Lambda MicroVMs' names).

The proxy, core (which renders them in outputs), the CLI and the build's ready check all use
these; the proxy compares lowercase bytes, derived here.
"""

from __future__ import annotations

#: The app's port when nothing else is said: the proxy's default target, the first EXPOSEd
#: port the ready check waits for, and the lifecycle hooks' port.
APP_PORT = 8080
#: The guest agent's PTY shell, reached at ``/shell`` with a shell token.
SHELL_PORT = 8022

AUTH_HEADER = "X-aws-proxy-auth"
"""Carries the endpoint or shell token."""
PORT_HEADER = "X-aws-proxy-port"
"""Which port of the VM a request is for (default ``APP_PORT``)."""
FORCE_H2_HEADER = "X-aws-proxy-force-h2"
"""``true``: an HTTP/1.1 client's request goes to the app as h2c."""
PROXY_HEADER_PREFIX = "X-aws-proxy-"
"""Every header with this prefix is the proxy's: none reaches the app."""


def lower_bytes(name: str) -> bytes:
    """A header name as the proxy's parsers compare it."""
    return name.lower().encode("ascii")
