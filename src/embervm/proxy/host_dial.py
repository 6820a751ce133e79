"""The proxy's side of the fleet tunnel: reach a guest's port through the host that runs it.

``dial_via_host`` connects to a host's tunnel listener (its ``--advertise ADDR:PORT``), sends
the preamble (``embervm.tunnel_wire``: the VM, the port, signed with the fleet's key) and reads
the host's one-line answer. On ``OK`` the streams it returns carry the guest's bytes, as
``streams.open_upstream``'s do on one host. ``NOT_HERE`` raises ``NotHere``: the VM does not
run there (any more), so the caller resolves it again. Everything else is an ``OSError``, as a
guest that does not answer is for ``open_upstream`` (``GuestUnreachable``: the host could not
connect to the port; ``TunnelRefused``: the host refused the preamble — another key, a clock
more than 30 s off; ``TunnelError``: no valid answer), or ``TimeoutError``.
"""

from __future__ import annotations

import asyncio

from embervm.errors import EmbervmError
from embervm.proxy.limits import READ_SIZE
from embervm.tunnel_wire import MAX_ANSWER, Answer, new_preamble, parse_answer


class NotHere(EmbervmError):
    """The host does not run this VM: the route was stale, resolve it again."""


class TunnelError(OSError):
    """The host's tunnel did not answer as the protocol says."""


class TunnelRefused(TunnelError):
    """The host refused the preamble (a key or clock that does not match the host's)."""


class GuestUnreachable(TunnelError):
    """The host runs the VM, but nothing accepted a connection on the port."""


def split_address(host_address: str) -> tuple[str, int]:
    """``ADDR:PORT`` or ``[IPv6]:PORT`` as a host and a port; ValueError if it is neither."""
    host, sep, port = host_address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not a tunnel address (ADDR:PORT): {host_address!r}")
    return host, int(port)


async def dial_via_host(
    host_address: str,
    key: bytes,
    microvm_id: str,
    port: int,
    *,
    timeout: float,  # noqa: ASYNC109  # the one deadline of connect, preamble and answer
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams to ``microvm_id``'s ``port`` through the tunnel of the host at
    ``host_address``, positioned after the host's ``OK``; within ``timeout`` seconds in all.
    Raises ``NotHere``, an ``OSError`` or ``TimeoutError`` (module docstring)."""
    preamble = new_preamble(key, microvm_id, port)  # ValueError: the caller's bug
    host, host_port = split_address(host_address)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, host_port, limit=READ_SIZE)
            writer.write(preamble)
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                raise TunnelError(f"{host_address} closed the tunnel before answering") from exc
            except asyncio.LimitOverrunError as exc:
                raise TunnelError(f"{host_address} sent no answer line") from exc
        answer = parse_answer(line)
        if answer is Answer.OK:
            return reader, writer
        if answer is Answer.NOT_HERE:
            raise NotHere(f"{microvm_id} does not run on {host_address}")
        if answer is Answer.UNREACHABLE:
            raise GuestUnreachable(f"{microvm_id} port {port} does not answer on {host_address}")
        if answer is Answer.REFUSED:
            raise TunnelRefused(f"{host_address} refused the tunnel (fleet key or clock?)")
        raise TunnelError(f"{host_address} answered {line[:MAX_ANSWER]!r}")
    except BaseException:
        if writer is not None:
            writer.transport.abort()
        raise
