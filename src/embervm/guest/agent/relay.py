"""Reach the app from inside the guest: HTTP requests (lifecycle hooks) and TCP port probes.

The host can call the image's hooks (``/aws/lambda-microvms/runtime/v1/ready`` …) and wait
for the app's port through the agent, without any guest networking, host routing or proxy
being set up — which is the situation during image builds and right after a restore.
Only loopback is reachable this way.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

MAX_RESPONSE = 1024 * 1024
MAX_HEADERS = 100
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")


class RelayError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class HttpResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    truncated: bool


async def tcp_probe(port: int, limit: float) -> bool:
    """True if something accepts connections on 127.0.0.1:``port``."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), limit)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _check_token(value: str, what: str) -> str:
    if any(c in value for c in "\r\n\0") or len(value) > 8192:
        raise RelayError("bad_request", f"bad {what}")
    return value


async def http_request(
    method: str, port: int, path: str, headers: list[tuple[str, str]], body: bytes, limit: float
) -> HttpResponse:
    """One HTTP/1.1 request to 127.0.0.1:``port`` with ``Connection: close``."""
    if method not in _METHODS:
        raise RelayError("bad_request", f"method must be one of {_METHODS}")
    if not path.startswith("/"):
        raise RelayError("bad_request", "path must start with /")
    _check_token(path, "path")
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Connection: close",
        f"Content-Length: {len(body)}",
    ]
    for k, v in headers[:MAX_HEADERS]:
        if k.lower() in ("host", "connection", "content-length", "transfer-encoding"):
            continue
        lines.append(f"{_check_token(k, 'header name')}: {_check_token(v, 'header value')}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(request)
                await writer.drain()
                return await _read_response(reader, method)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError as exc:
        raise RelayError("timeout", f"no response from port {port} in {limit:.3g} s") from exc
    except ConnectionRefusedError as exc:
        raise RelayError("connection_refused", f"nothing listens on port {port}") from exc
    except (
        OSError,
        ValueError,
        UnicodeDecodeError,
        asyncio.LimitOverrunError,
        asyncio.IncompleteReadError,
    ) as exc:
        raise RelayError("http_error", f"{type(exc).__name__}: {exc}") from exc


async def _read_response(reader: asyncio.StreamReader, method: str) -> HttpResponse:
    status_line = (await reader.readline()).decode("latin-1").rstrip("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"bad status line {status_line[:100]!r}")
    status = int(parts[1])
    headers: list[tuple[str, str]] = []
    while True:
        line = (await reader.readline()).decode("latin-1").rstrip("\r\n")
        if not line:
            break
        if len(headers) >= MAX_HEADERS:
            raise ValueError("too many response headers")
        k, _, v = line.partition(":")
        headers.append((k.strip(), v.strip()))
    hmap = {k.lower(): v for k, v in headers}
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return HttpResponse(status, headers, b"", False)
    if "chunked" in hmap.get("transfer-encoding", "").lower():
        body, truncated = await _read_chunked(reader)
    elif "content-length" in hmap:
        n = int(hmap["content-length"])
        body = await reader.readexactly(min(n, MAX_RESPONSE))
        truncated = n > MAX_RESPONSE
    else:
        body = await reader.read(MAX_RESPONSE + 1)
        truncated = len(body) > MAX_RESPONSE
        body = body[:MAX_RESPONSE]
    return HttpResponse(status, headers, body, truncated)


async def _read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    out = bytearray()
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return bytes(out), False
        if len(out) + size > MAX_RESPONSE:
            out += await reader.readexactly(MAX_RESPONSE - len(out))
            return bytes(out), True
        out += await reader.readexactly(size)
        await reader.readline()
