"""The agent's end of the host channel: a non-blocking fd with reconnect and bounded buffers.

In the guest the fd is the virtio-serial port. Its quirks shape this class: when no host is
connected, ``read`` returns 0 and ``poll`` reports HUP continuously (so we stop watching the fd
and probe it every ``probe_interval`` instead of spinning), and ``write`` would block (so output
is buffered, bounded, and dropped if the host stays away). In unit tests the fd is one end of a
socketpair, where EOF means the peer is gone for good (``reconnectable=False``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
from collections.abc import Callable

from .protocol import Decoder, Frame

READ_SIZE = 256 * 1024
#: Above this many buffered output bytes, producers wait in ``drain``.
HIGH_WATER = 4 * 1024 * 1024
#: Absolute bound; beyond it frames are dropped (the host is not reading at all).
HARD_LIMIT = 32 * 1024 * 1024


class Channel:
    """Frames in, frames out, over one fd; survives the host going away and coming back."""

    def __init__(
        self,
        fd: int,
        on_frame: Callable[[Frame], None],
        on_connect: Callable[[], None],
        on_disconnect: Callable[[], None],
        *,
        reconnectable: bool,
        probe_interval: float = 0.02,
    ) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self._on_frame = on_frame
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._reconnectable = reconnectable
        self._probe_interval = probe_interval
        self._loop = asyncio.get_running_loop()
        # The host is the trusted side: its stream may resync across reconnects without limit.
        self._decoder = Decoder(resync_budget=None)
        self._out = bytearray()
        self._writing = False
        self._drained = asyncio.Event()
        self._drained.set()
        self.connected = False
        self.closed = asyncio.Event()
        self.dropped_frames = 0
        self._probe: asyncio.Task[None] | None = None

    @property
    def discarded_bytes(self) -> int:
        return self._decoder.discarded

    def start(self) -> None:
        self._set_connected()

    def _set_connected(self) -> None:
        self.connected = True
        self._decoder.reset()
        self._loop.add_reader(self.fd, self._readable)
        if self._out:
            self._start_writing()
        self._on_connect()

    def _set_disconnected(self) -> None:
        if not self.connected:
            return
        self.connected = False
        self._loop.remove_reader(self.fd)
        self._stop_writing()
        self._out.clear()  # stale output for a host that is gone; sessions reset on hello
        self._drained.set()
        self._on_disconnect()
        if self._reconnectable:
            self._probe = self._loop.create_task(self._wait_for_host())
        else:
            self.closed.set()

    def _probe_delay(self, away: float) -> float:
        """Probe fast right after a disconnect (a restore or reconnect is usually imminent),
        then slower, so a VM left without a host does not burn TCG time waking up."""
        if away < 1.0:
            return self._probe_interval / 4
        if away < 10.0:
            return self._probe_interval
        return self._probe_interval * 5

    async def _wait_for_host(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        since = self._loop.time()
        while True:
            await asyncio.sleep(self._probe_delay(self._loop.time() - since))
            events = poller.poll(0)
            hup = any(ev & select.POLLHUP for _, ev in events)
            if not hup:
                self._set_connected()
                return

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._set_disconnected()
            return
        for frame in self._decoder.feed(data):
            self._on_frame(frame)

    def send(self, frame: bytes) -> bool:
        """Queue one encoded frame; False if it was dropped (no host, or host not reading)."""
        if not self.connected or len(self._out) + len(frame) > HARD_LIMIT:
            self.dropped_frames += 1
            return False
        self._out += frame
        if len(self._out) > HIGH_WATER:
            self._drained.clear()
        if not self._writing:
            self._flush()
            if self._out:
                self._start_writing()
        return True

    async def drain(self) -> None:
        """Wait while the output buffer is above the high-water mark (backpressure)."""
        await self._drained.wait()

    def _start_writing(self) -> None:
        if not self._writing and self.connected:
            self._writing = True
            self._loop.add_writer(self.fd, self._writable)

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self.fd)

    def _flush(self) -> None:
        while self._out:
            try:
                n = os.write(self.fd, self._out[:READ_SIZE])
            except BlockingIOError:
                return
            except OSError:
                self._set_disconnected()
                return
            del self._out[:n]
        if len(self._out) <= HIGH_WATER:
            self._drained.set()

    def _writable(self) -> None:
        self._flush()
        if not self._out:
            self._stop_writing()
        elif len(self._out) <= HIGH_WATER:
            self._drained.set()

    def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        if self.connected:
            self._loop.remove_reader(self.fd)
            self._stop_writing()
            self.connected = False
        self.closed.set()
        with contextlib.suppress(OSError):
            os.close(self.fd)
