"""Writing a snapshot's state file: a full disk is reported as a full disk.

A fake QEMU (the two QMP calls ``migrate_to_file`` makes, and a thread writing a stream into
the pipe it was handed) migrates into ``/dev/full``, where every write fails with ENOSPC. The
real-VM version, a loop-mounted filesystem filled up, is ``tests/integration/chaos``.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from embervm.vmm.qmp import migrate_to_file

STREAM = 4 << 20  # more than the pipe holds: QEMU is still writing when our end gives up


class FakeQemu:
    """Answers ``getfd``/``migrate``/``query-migrate`` like QEMU and writes a stream."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.status = "active"
        self.thread: threading.Thread | None = None

    async def send_fd(self, fd: int, fdname: str) -> None:
        self.fd = os.dup(fd)

    async def cmd(self, name: str, args: dict[str, Any] | None = None, **_: object) -> Any:
        if name == "migrate":
            self.thread = threading.Thread(target=self._write)
            self.thread.start()
        if name == "query-migrate":
            return {"status": self.status, "error-desc": "Unable to write to fd: Broken pipe"}
        return {}

    def _write(self) -> None:
        assert self.fd is not None
        stream = memoryview(bytes(STREAM))
        try:
            while stream:
                stream = stream[os.write(self.fd, stream) :]
            self.status = "completed"
        except BrokenPipeError:
            self.status = "failed"
        finally:
            os.close(self.fd)


async def test_a_full_disk_says_so_not_broken_pipe() -> None:
    qemu = FakeQemu()
    with pytest.raises(OSError, match="No space left on device") as failed:
        await migrate_to_file(qemu, Path("/dev/full"), timeout=10)  # type: ignore[arg-type]
    assert failed.value.errno == errno.ENOSPC
    assert "writing full" in str(failed.value)  # the file it was writing
    assert qemu.thread is not None
    qemu.thread.join(10)
    assert qemu.status == "failed"
