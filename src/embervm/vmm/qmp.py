"""QMP over a unix socket with ``qemu.qmp``: every command bounded, every failure a ``VmmError``."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import logging
import mmap
import os
import socket
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError

from embervm.errors import SnapshotError, VmmError
from embervm.vmm import ramdelta

DEFAULT_TIMEOUT = 30.0
_RETRY = 0.01

# qemu.qmp logs every disconnect at WARNING/ERROR; the VMM reports what matters itself.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class Qmp:
    """One QMP session to one QEMU."""

    def __init__(self, client: QMPClient, path: Path) -> None:
        self._client = client
        self.path = path

    @classmethod
    async def connect(
        cls,
        path: Path,
        *,
        timeout: float,  # noqa: ASYNC109
        alive: asyncio.Future[Any] | None = None,
    ) -> Qmp:
        """Connect, retrying while QEMU has not created the socket yet; gives up early when
        ``alive`` (the process's exit future) completes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: BaseException | None = None
        while loop.time() < deadline:
            if alive is not None and alive.done():
                raise VmmError(f"QEMU exited before QMP at {path} answered")
            client = QMPClient(f"embervm-{path.parent.name}")
            try:
                await asyncio.wait_for(client.connect(str(path)), max(deadline - loop.time(), 0.01))
                return cls(client, path)
            except (ConnectError, OSError, TimeoutError) as exc:
                last = exc
                await _disconnect(client)
                await asyncio.sleep(_RETRY)
        raise VmmError(f"QMP at {path} did not answer within {timeout:.1f} s: {last!r}") from last

    async def cmd(
        self,
        name: str,
        args: dict[str, Any] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109
    ) -> Any:
        try:
            return await asyncio.wait_for(self._client.execute(name, args), timeout)
        except ExecuteError as exc:
            raise VmmError(f"QMP {name} failed: {exc.error.error.desc}") from exc
        except (ExecInterruptedError, QMPError, OSError, EOFError) as exc:
            raise VmmError(f"QMP {name}: connection to QEMU lost ({exc!r})") from exc
        except TimeoutError as exc:
            raise VmmError(f"QMP {name} did not answer within {timeout:.1f} s") from exc

    async def send_fd(self, fd: int, fdname: str) -> None:
        """Hand QEMU an open file (SCM_RIGHTS) under ``fdname``: QEMU opens no file by itself
        for migrations, which keeps ``-sandbox spawn=deny`` possible (no ``exec:`` URIs)."""
        try:
            _send_fd(self._client, fd)
        except (QMPError, OSError, AttributeError) as exc:
            raise VmmError(f"cannot pass a file descriptor to QEMU: {exc!r}") from exc
        await self.cmd("getfd", {"fdname": fdname})

    async def add_fd(self, fd: int, fdset_id: int | None = None) -> int:
        """Hand QEMU an open file in fd set ``fdset_id`` (a new one when None); the set's id.
        QEMU opens ``/dev/fdset/<id>`` by duplicating the member with the access mode it asks
        for: how the block layer takes files it may not open itself (a jailed QEMU)."""
        try:
            _send_fd(self._client, fd)
        except (QMPError, OSError, AttributeError) as exc:
            raise VmmError(f"cannot pass a file descriptor to QEMU: {exc!r}") from exc
        args = {} if fdset_id is None else {"fdset-id": fdset_id}
        return int((await self.cmd("add-fd", args))["fdset-id"])

    async def close(self) -> None:
        await _disconnect(self._client)


def _send_fd(client: QMPClient, fd: int) -> None:
    """SCM_RIGHTS over the QMP connection's socket, on any event loop.

    qemu.qmp's ``send_fd_scm`` reaches into asyncio's ``TransportSocket._sock``, which
    uvloop's transports do not have; a duplicate of the socket's descriptor works on both.
    Like qemu.qmp, the byte goes out beside the transport's buffer: QMP is idle between
    commands, so nothing is queued there when a file is handed over.
    """
    writer = client._writer  # qemu.qmp exposes no transport otherwise
    if writer is None:
        raise QMPError("QMP is not connected")
    transport_socket = writer.transport.get_extra_info("socket")
    with socket.socket(fileno=os.dup(transport_socket.fileno())) as dup:
        if dup.family != socket.AF_UNIX:
            raise QMPError("file descriptors pass only over a unix socket")
        socket.send_fds(dup, [b" "], [fd])


async def _disconnect(client: QMPClient) -> None:
    with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError):
        await asyncio.wait_for(client.disconnect(), 5)


_CHUNK = 1 << 20
_ALIGN = 4096


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _CHUNK)
    return r, w


class _DirectFile:
    """A new file written through an aligned buffer, hashed on the way: (size, sha256).

    Written with O_DIRECT where the filesystem allows it: a suspend's state file is written
    once and read once, and going around the page cache made writing 138 MiB 0.09 s instead of
    0.4 s here (allocating page-cache pages is what costs on these hosts).
    """

    def __init__(self, dest: Path) -> None:
        self.digest = hashlib.sha256()
        self.size = self.fill = 0
        self._buf = mmap.mmap(-1, _CHUNK)  # page-aligned, as O_DIRECT wants
        self.view = memoryview(self._buf)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            self.fd = os.open(dest, flags | os.O_DIRECT, 0o600)
            self.direct = True
        except OSError:  # e.g. tmpfs
            self.fd = os.open(dest, flags, 0o600)
            self.direct = False

    def read_from(self, r: int) -> int:
        """Read from ``r`` straight into the buffer (no copy); 0 at EOF."""
        n = os.readv(r, [self.view[self.fill :]])
        self._filled(n)
        return n

    def write(self, data: bytes) -> None:
        while data:
            n = min(len(data), _CHUNK - self.fill)
            self.view[self.fill : self.fill + n] = data[:n]
            self._filled(n)
            data = data[n:]

    def _filled(self, n: int) -> None:
        self.digest.update(self.view[self.fill : self.fill + n])
        self.fill += n
        self.size += n
        if self.fill == _CHUNK:
            _write_all(self.fd, self.view)
            self.fill = 0

    def finish(self) -> tuple[int, str]:
        """Write what is buffered (the unaligned tail without O_DIRECT)."""
        aligned = self.fill - self.fill % _ALIGN if self.direct else self.fill
        _write_all(self.fd, self.view[:aligned])
        if aligned < self.fill:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            _write_all(self.fd, self.view[aligned : self.fill])
        self.fill = 0
        return self.size, self.digest.hexdigest()

    def close(self) -> None:
        os.close(self.fd)


def _drain_to_file(r: int, dest: Path, base: Path | None) -> tuple[int, str]:
    """Copy the pipe into ``dest`` until EOF: (size, sha256). With ``base``, the pages the
    guest still shares with that RAM file are left out (``ramdelta``)."""
    out = _DirectFile(dest)
    try:
        if base is None:
            while out.read_from(r):
                pass
        else:
            delta_base = ramdelta.Base(base)
            try:
                ramdelta.filter_stream(functools.partial(os.read, r), out.write, delta_base)
            finally:
                delta_base.close()
        return out.finish()
    except OSError as exc:  # ENOSPC above all: say which file, keep the errno
        raise OSError(exc.errno, f"{exc.strerror} (writing {dest.name})") from exc
    finally:
        # Close the fds first: an exception's traceback may still pin slices of the buffer.
        out.close()
        os.close(r)  # a writer QEMU gets EPIPE and fails the migration at once


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _feed_from_file(src: Path, w: int) -> str:
    """Copy ``src`` into the pipe, hashing on the way; the sha256 (EPIPE if QEMU gave up).

    Read with O_DIRECT where possible: a state file written with O_DIRECT is not in the page
    cache, and large direct reads beat the kernel's readahead on a cold file.
    """
    digest = hashlib.sha256()
    buf = mmap.mmap(-1, _CHUNK)
    view = memoryview(buf)
    try:
        try:
            fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError:
            fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while n := os.readv(fd, [view]):
                _write_all(w, view[:n])  # QEMU loads this chunk while we hash it
                digest.update(view[:n])
        finally:
            os.close(fd)
    finally:
        os.close(w)
    return digest.hexdigest()


async def migrate_to_file(
    qmp: Qmp,
    dest: Path,
    *,
    timeout: float,  # noqa: ASYNC109
    base: Path | None = None,
) -> tuple[int, str]:
    """Run an outgoing migration into ``dest``; returns its size and sha256.

    QEMU writes into a pipe that a thread copies to the file while hashing, so the checksum
    costs no time after the migration ends. ``base``: the RAM file the guest's memory is a
    private mapping of; pages still equal to it are left out (``ramdelta``), and a stream the
    filter cannot rewrite raises ``DeltaUnsupported`` (the caller takes a full one instead).
    When writing the file fails (disk full, I/O error) that ``OSError`` is raised, naming the
    file, rather than QEMU's report of the pipe it then saw closed.
    """
    r, w = _pipe()
    try:
        await qmp.send_fd(w, "embervm-mig")
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    writer = asyncio.ensure_future(asyncio.to_thread(_drain_to_file, r, dest, base))
    try:
        await qmp.cmd("migrate", {"uri": "fd:embervm-mig"})
        try:
            await _wait_migration(qmp, writer, timeout=timeout, what=f"migration to {dest}")
        except VmmError:
            # Our end gave up and closed the pipe: say why rather than QEMU's EPIPE.
            done, _ = await asyncio.wait({writer}, timeout=5)
            if done and isinstance(
                problem := writer.exception(), ramdelta.DeltaUnsupported | OSError
            ):
                raise problem from None
            raise
        return await asyncio.wait_for(asyncio.shield(writer), timeout)
    except BaseException:
        # QEMU closes its end when the migration fails or is cancelled: the thread then ends.
        writer.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise


async def migrate_from_file(
    qmp: Qmp,
    src: Path,
    *,
    sha256: str | None,
    timeout: float,  # noqa: ASYNC109
) -> None:
    """Load an incoming migration (``-incoming defer``) from ``src`` and wait for the end.

    The file is fed through a pipe by a thread that hashes it on the way; a digest other than
    ``sha256`` raises ``SnapshotError`` before the caller can ``cont`` the guest.
    """
    r, w = _pipe()
    try:
        await qmp.send_fd(r, "embervm-mig")
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    feeder = asyncio.ensure_future(asyncio.to_thread(_feed_from_file, src, w))
    try:
        await qmp.cmd("migrate-incoming", {"uri": "fd:embervm-mig"})
        await _wait_migration(qmp, feeder, timeout=timeout, what=f"restore from {src}")
        digest = await asyncio.wait_for(asyncio.shield(feeder), timeout)
    except BaseException:
        feeder.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise
    if sha256 is not None and digest != sha256:
        raise SnapshotError(f"{src} is corrupt (sha256 mismatch)")


async def _wait_migration(
    qmp: Qmp,
    pipe_end: asyncio.Future[Any],
    *,
    timeout: float,  # noqa: ASYNC109
    what: str,
) -> None:
    """Wait until QEMU says the migration completed (or failed).

    The thread at our end of the pipe finishes when QEMU has read (or written) the last byte,
    or gave up: QEMU is asked only after that, so a fast load is seen at once instead of
    at the next tick of a backing-off poll.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    await asyncio.wait({pipe_end}, timeout=timeout)
    delay = 0.001
    while True:
        info = await qmp.cmd("query-migrate")
        status = info.get("status", "none")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise VmmError(f"{what} {status}: {info.get('error-desc', 'no detail')}")
        if loop.time() > deadline:
            raise VmmError(f"{what} did not complete within {timeout:.1f} s (status {status})")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.02)


async def set_migration_caps(qmp: Qmp, *, ignore_shared: bool) -> None:
    await qmp.cmd(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "x-ignore-shared", "state": ignore_shared}]},
    )
