"""Keep out of a RAM migration stream the pages a VM still shares with its image.

A clone's RAM is a private copy-on-write mapping of its image's RAM file (the *base*), so most
of its pages are still byte for byte the image's. QEMU's migration stream (what a suspend
writes) carries every page anyway: a ``PAGE`` record (4 KiB of data) for each non-zero page, a
``ZERO`` record for each zero page. ``filter_stream`` copies the stream and drops

- ``PAGE`` records whose data equals the base file's page at the same offset, and
- ``ZERO`` records for pages that are holes in the base file (they read as zeros there too),

so that loading the filtered stream into RAM mapped over the same base file (``share=off``)
gives the guest exactly the memory it had. A resume then loads only what the guest changed
since its image instead of every non-zero page into fresh memory.

The format is QEMU's (``migration/savevm.c``, ``migration/ram.c``; the same in every QEMU this
project supports): a header, the configuration section, then sections. Only the ``ram``
section is rewritten; it must come before any device section (QEMU writes every iterable
section first). Anything unexpected raises ``DeltaUnsupported`` and the caller takes a full
stream instead: the filter never guesses.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, repeat
from pathlib import Path

from embervm.errors import SnapshotError
from embervm.vmm.cmdline import RAM_BACKEND

PAGE_SIZE = 4096
_FILE_MAGIC = 0x5145564D
_FILE_VERSION = 3

# Section types (savevm.c).
_SECTION_START = 0x01
_SECTION_PART = 0x02
_SECTION_END = 0x03
_SUBSECTION = 0x05
_CONFIGURATION = 0x07
_SECTION_FOOTER = 0x7E

# RAM record flags (ram.c): the low 12 bits of each record's be64 page address.
_FLAG_ZERO = 0x02
_FLAG_MEM_SIZE = 0x04
_FLAG_PAGE = 0x08
_FLAG_EOS = 0x10
_FLAG_CONTINUE = 0x20
_FLAGS_MASK = PAGE_SIZE - 1

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_ZERO_RECORD = struct.Struct(">QB")  # address | ZERO | CONTINUE, fill byte
_ZERO_CONT = _FLAG_ZERO | _FLAG_CONTINUE  # low byte of a continued zero record
_PAGE_CONT = _FLAG_PAGE | _FLAG_CONTINUE  # low byte of a continued data record
# A run of "same block, zero page, filled with 0" records: 9 bytes each, flags byte 0x22 and
# the next byte (bits 8-11 of the flags, then address bits) with a zero low nibble.
_ZERO_RUN = re.compile(rb"(?:[\x00-\xff]{6}[\x00\x10\x20\x30\x40\x50\x60\x70\x80\x90\xa0\xb0"
                       rb"\xc0\xd0\xe0\xf0]\x22\x00)+", re.DOTALL)  # fmt: skip
_ZERO_PAGE = bytes(PAGE_SIZE)
_MAX_MACHINE_NAME = 256


class DeltaUnsupported(SnapshotError):
    """The stream has a shape this filter does not rewrite (take a full stream instead)."""


class Base:
    """The base RAM file: its pages, and which of them are holes (read as zeros)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.size = os.fstat(fd).st_size
            self.data = mmap.mmap(fd, self.size, prot=mmap.PROT_READ) if self.size else None
            self.allocated = _allocated_pages(fd, self.size)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.data is not None:
            self.data.close()

    def page_equals(self, offset: int, page: bytes | memoryview) -> bool:
        if self.data is None or offset + PAGE_SIZE > self.size:
            return False
        if not self.allocated[offset // PAGE_SIZE]:
            return False  # a hole reads as zeros; a PAGE record is never all zeros
        return self.data[offset : offset + PAGE_SIZE] == page

    def reads_zero(self, offset: int) -> bool:
        """Whether the base's page at ``offset`` is all zeros (a hole, or zeros written)."""
        if self.data is None or offset + PAGE_SIZE > self.size:
            return False
        if not self.allocated[offset // PAGE_SIZE]:
            return True
        return self.data[offset : offset + PAGE_SIZE] == _ZERO_PAGE


def _allocated_pages(fd: int, size: int) -> bytearray:
    """One byte per page: 1 where the file has data (SEEK_DATA), 0 in holes."""
    pages = bytearray((size + PAGE_SIZE - 1) // PAGE_SIZE)
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        first, last = start // PAGE_SIZE, (end + PAGE_SIZE - 1) // PAGE_SIZE
        pages[first:last] = b"\x01" * (last - first)
        pos = end
    return pages


class Source:
    """A blocking buffered reader over a pipe (QEMU writes the stream into it)."""

    def __init__(self, read: Callable[[int], bytes], chunk: int = 1 << 20) -> None:
        self._read = read
        self._chunk = chunk
        self.buf = b""
        self.pos = 0

    def fill(self, n: int) -> bool:
        """Make ``n`` bytes available at ``pos``; False at EOF before that."""
        while len(self.buf) - self.pos < n:
            more = self._read(max(self._chunk, n))
            if not more:
                return False
            self.buf = self.buf[self.pos :] + more
            self.pos = 0
        return True

    def take(self, n: int) -> bytes:
        if not self.fill(n):
            raise DeltaUnsupported("the migration stream ended early")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def peek(self) -> int | None:
        return self.buf[self.pos] if self.fill(1) else None

    def rest(self) -> Iterator[bytes]:
        """What is buffered, then everything up to EOF."""
        yield self.buf[self.pos :]
        self.buf, self.pos = b"", 0
        while more := self._read(self._chunk):
            yield more


class Stats:
    """What the filter kept and dropped (for the manifest and the benchmarks)."""

    def __init__(self) -> None:
        self.pages_kept = self.pages_dropped = self.zeros_kept = self.zeros_dropped = 0


def filter_stream(
    read: Callable[[int], bytes],
    write: Callable[[bytes], None],
    base: Base,
    *,
    base_block: str = RAM_BACKEND,
) -> Stats:
    """Copy the migration stream from ``read`` to ``write`` without the pages ``base`` holds.

    ``base_block`` is the RAM block mapped over ``base`` (the ``memory-backend`` id). Raises
    ``DeltaUnsupported`` on a stream it cannot rewrite safely.
    """
    return _Filter(Source(read), write, base, base_block.encode()).run()


class _Filter:
    def __init__(self, src: Source, write: Callable[[bytes], None], base: Base, block: bytes):
        self.src = src
        self.write = write
        self.base = base
        self.base_block = block
        self.stats = Stats()
        self.blocks: dict[bytes, int] = {}
        self.ram_section: int | None = None
        self.block: bytes | None = None  # the block of the last record read
        self.sent_block: bytes | None = None  # the block of the last record written

    def run(self) -> Stats:
        head = self.src.take(8)
        magic, version = struct.unpack(">II", head)
        if magic != _FILE_MAGIC or version != _FILE_VERSION:
            raise DeltaUnsupported(f"not a QEMU migration stream v3 ({head.hex()})")
        self.write(head)
        if self.src.peek() == _CONFIGURATION:
            self._configuration()
        while True:
            kind = self.src.byte()
            if kind == _SECTION_START:
                self._ram_start()
            elif kind in (_SECTION_PART, _SECTION_END):
                self._ram_part(kind)
                if kind == _SECTION_END:
                    break
            else:
                raise DeltaUnsupported(f"section type {kind:#x} before the RAM section ended")
        # Device sections, EOF and the description: copied as they are.
        for chunk in self.src.rest():
            self.write(chunk)
        return self.stats

    # -- framing ---------------------------------------------------------------------------

    def _configuration(self) -> None:
        src = self.src
        out = [bytes([src.byte()])]
        length = src.take(4)
        if _BE32.unpack(length)[0] > _MAX_MACHINE_NAME:
            raise DeltaUnsupported("configuration section with an oversized machine name")
        out += [length, src.take(_BE32.unpack(length)[0])]
        while src.peek() == _SUBSECTION:
            out.append(bytes([src.byte()]))
            name_len = src.take(1)
            name = src.take(name_len[0])
            out += [name_len, name, src.take(4)]
            if name == b"configuration/target-page-bits":
                out.append(src.take(4))
            elif name == b"configuration/uuid":
                out.append(src.take(16))
            else:
                raise DeltaUnsupported(f"configuration subsection {name!r}")
        self.write(b"".join(out))

    def _ram_start(self) -> None:
        src = self.src
        section = src.take(4)
        name_len = src.take(1)
        name = src.take(name_len[0])
        ids = src.take(8)  # instance id, version id
        if name != b"ram" or self.ram_section is not None:
            raise DeltaUnsupported(f"iterable section {name!r} besides RAM")
        self.ram_section = _BE32.unpack(section)[0]
        self.write(b"".join((bytes([_SECTION_START]), section, name_len, name, ids)))
        self._mem_size()
        self._records()
        self._footer(section)

    def _ram_part(self, kind: int) -> None:
        section = self.src.take(4)
        if self.ram_section is None or _BE32.unpack(section)[0] != self.ram_section:
            raise DeltaUnsupported("a section other than RAM before the RAM section ended")
        self.write(bytes([kind]) + section)
        self._records()
        self._footer(section)

    def _footer(self, section: bytes) -> None:
        if self.src.peek() == _SECTION_FOOTER:
            footer = self.src.take(5)
            if footer[1:] != section:
                raise DeltaUnsupported("section footer does not match its section")
            self.write(footer)

    def _mem_size(self) -> None:
        """The RAM blocks: name and length each (no postcopy, no ignore-shared here)."""
        head = self.src.take(8)
        value = _BE64.unpack(head)[0]
        if value & _FLAGS_MASK != _FLAG_MEM_SIZE:
            raise DeltaUnsupported("RAM section does not start with its block list")
        out = [head]
        total = value & ~_FLAGS_MASK
        while total > 0:
            name_len = self.src.take(1)
            name = self.src.take(name_len[0])
            length = self.src.take(8)
            size = _BE64.unpack(length)[0]
            self.blocks[name] = size
            out += [name_len, name, length]
            total -= size
        if total != 0:
            raise DeltaUnsupported("RAM block sizes do not add up")
        if self.blocks.get(self.base_block) != self.base.size:
            raise DeltaUnsupported(
                f"RAM block {self.base_block!r} is not the size of {self.base.path}"
            )
        self.write(b"".join(out))

    # -- records -----------------------------------------------------------------------------

    def _records(self) -> None:
        src = self.src
        base = self.base
        while True:
            # Fast paths: continued records of the base block (nearly all of a stream).
            if self.block == self.base_block and src.fill(9):
                buf, pos = src.buf, src.pos
                low, flags_byte = buf[pos + 6] & 0x0F, buf[pos + 7]
                if low == 0 and flags_byte == _ZERO_CONT and buf[pos + 8] == 0:
                    run = _ZERO_RUN.match(buf, pos)
                    assert run is not None  # the bytes just checked are one such record
                    self._zero_run(run.end() - pos)
                    continue
                if low == 0 and flags_byte == _PAGE_CONT and src.fill(8 + PAGE_SIZE):
                    buf, pos = src.buf, src.pos
                    addr = _BE64.unpack_from(buf, pos)[0] & ~_FLAGS_MASK
                    page = buf[pos + 8 : pos + 8 + PAGE_SIZE]
                    src.pos = pos + 8 + PAGE_SIZE
                    if base.page_equals(addr, page):
                        self.stats.pages_dropped += 1
                    else:
                        self.stats.pages_kept += 1
                        self._send(addr | _FLAG_PAGE, page)
                    continue
            head = src.take(8)
            value = _BE64.unpack(head)[0]
            flags = value & _FLAGS_MASK
            addr = value & ~_FLAGS_MASK
            if flags == _FLAG_EOS:
                self.write(head)
                return
            if flags & _FLAG_CONTINUE:
                if self.block is None:
                    raise DeltaUnsupported("a continued RAM record without a block")
            else:
                name = src.take(src.byte())
                if name not in self.blocks:
                    raise DeltaUnsupported(f"RAM record for unknown block {name!r}")
                self.block = name
            kind = flags & ~_FLAG_CONTINUE
            on_base = self.block == self.base_block
            if kind == _FLAG_ZERO:
                fill = src.take(1)
                if on_base and fill == b"\0" and base.reads_zero(addr):
                    self.stats.zeros_dropped += 1
                    continue
                self.stats.zeros_kept += 1
                self._send(addr | _FLAG_ZERO, fill)
            elif kind == _FLAG_PAGE:
                page = src.take(PAGE_SIZE)
                if on_base and base.page_equals(addr, page):
                    self.stats.pages_dropped += 1
                    continue
                self.stats.pages_kept += 1
                self._send(addr | _FLAG_PAGE, page)
            else:
                raise DeltaUnsupported(f"RAM record flags {flags:#x}")

    def _send(self, value: int, payload: bytes) -> None:
        if self.sent_block == self.block:
            self.write(_BE64.pack(value | _FLAG_CONTINUE) + payload)
            return
        assert self.block is not None
        self.sent_block = self.block
        self.write(_BE64.pack(value) + bytes([len(self.block)]) + self.block + payload)

    def _zero_run(self, length: int) -> None:
        """``length`` bytes of continued zero records of the base block, read at C speed.

        When their addresses are consecutive pages (QEMU walks RAM in order), only the pages
        that hold data in the base are looked at; otherwise each record on its own.
        """
        src = self.src
        start = src.pos
        n = length // 9
        first = _BE64.unpack_from(src.buf, start)[0] & ~_FLAGS_MASK
        expect = b"".join(map(_ZERO_RECORD.pack,
                              range(first | _ZERO_CONT, first + n * PAGE_SIZE, PAGE_SIZE),
                              repeat(0, n)))  # fmt: skip
        src.pos += length
        allocated = self.base.allocated
        begin = first // PAGE_SIZE
        end = begin + n
        if src.buf[start : start + length] == expect and end <= len(allocated):
            spans: list[range] = []
            data = allocated.find(1, begin, end)
            while data >= 0:  # the runs of base pages with data inside [begin, end)
                hole = allocated.find(0, data, end)
                hole = end if hole < 0 else hole
                spans.append(range(data * PAGE_SIZE, hole * PAGE_SIZE, PAGE_SIZE))
                data = allocated.find(1, hole, end)
            addrs: Iterable[int] = chain.from_iterable(spans)
            self.stats.zeros_dropped += n - sum(map(len, spans))  # the holes
        else:
            addrs = (_BE64.unpack_from(src.buf, start + 9 * i)[0] & ~_FLAGS_MASK for i in range(n))
        for addr in addrs:
            if self.base.reads_zero(addr):
                self.stats.zeros_dropped += 1
            else:
                self.stats.zeros_kept += 1
                self._send(addr | _FLAG_ZERO, b"\0")
