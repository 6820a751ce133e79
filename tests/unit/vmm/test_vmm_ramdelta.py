"""``ramdelta.filter_stream`` on synthetic QEMU migration streams.

The property that matters: loading the filtered stream over the base file gives the same
memory as loading the whole stream over zeroed memory. A small reference loader below applies
a stream's RAM records the way QEMU's ``ram_load_precopy`` does.
"""

from __future__ import annotations

import io
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from embervm.vmm.ramdelta import PAGE_SIZE, Base, DeltaUnsupported, filter_stream

BASE = b"ram0"
ROM = b"/rom@etc/acpi/tables"
PAGES = 64
ROM_PAGES = 2


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


def page(fill: int) -> bytes:
    return bytes([fill]) * PAGE_SIZE


def zero(addr: int, block: bytes | None = None) -> bytes:
    if block is None:
        return be64(addr | 0x22) + b"\0"
    return be64(addr | 0x02) + bytes([len(block)]) + block + b"\0"


def data(addr: int, payload: bytes, block: bytes | None = None) -> bytes:
    if block is None:
        return be64(addr | 0x28) + payload
    return be64(addr | 0x08) + bytes([len(block)]) + block + payload


EOS = be64(0x10)
FOOTER = b"\x7e" + be32(2)
DEVICES = b"\x04" + be32(3) + b"\x06serial" + be32(0) + be32(1) + b"opaque\x00device" + b"\x03"


def stream(*parts: bytes, blocks: tuple[tuple[bytes, int], ...] | None = None) -> bytes:
    blocks = blocks or ((BASE, PAGES * PAGE_SIZE), (ROM, ROM_PAGES * PAGE_SIZE))
    out = struct.pack(">II", 0x5145564D, 3) + b"\x07" + be32(7) + b"microvm"
    out += b"\x01" + be32(2) + b"\x03ram" + be32(0) + be32(4)
    out += be64(sum(size for _, size in blocks) | 0x04)
    for name, size in blocks:
        out += bytes([len(name)]) + name + be64(size)
    out += EOS + FOOTER
    for i, records in enumerate(parts):
        kind = b"\x03" if i == len(parts) - 1 else b"\x02"
        out += kind + be32(2) + records + EOS + FOOTER
    return out + DEVICES


def load(data_: bytes, memory: dict[bytes, bytearray]) -> bytes:
    """Apply the RAM records of ``data_`` onto ``memory``; return the bytes after RAM."""
    f = io.BytesIO(data_)
    f.read(8 + 1 + 4 + 7)
    block: bytes | None = None
    while True:
        kind = f.read(1)[0]
        section = f.read(4)
        if kind == 0x01:
            f.read(f.read(1)[0] + 8)
        elif kind == 0x04:
            f.seek(-5, io.SEEK_CUR)
            return f.read()
        while True:
            value = struct.unpack(">Q", f.read(8))[0]
            flags, addr = value & 0xFFF, value & ~0xFFF
            if flags & 0x10:
                break
            if flags & 0x04:
                total = addr
                while total:
                    f.read(f.read(1)[0])  # the block name
                    total -= struct.unpack(">Q", f.read(8))[0]
                continue
            if not flags & 0x20:
                block = f.read(f.read(1)[0])
            assert block is not None
            mem = memory[block]
            if flags & 0x02:
                fill = f.read(1)[0]
                if fill or any(mem[addr : addr + PAGE_SIZE]):
                    mem[addr : addr + PAGE_SIZE] = bytes([fill]) * PAGE_SIZE
            else:
                mem[addr : addr + PAGE_SIZE] = f.read(PAGE_SIZE)
        assert f.read(5) == b"\x7e" + section


def make_base(tmp_path: Path, pages: dict[int, bytes]) -> Path:
    """A sparse base file: data at ``pages``, holes elsewhere."""
    path = tmp_path / "base"
    with path.open("wb") as f:
        f.truncate(PAGES * PAGE_SIZE)
        for n, payload in pages.items():
            f.seek(n * PAGE_SIZE)
            f.write(payload)
    return path


def run_filter(src: bytes, base_path: Path, chunk: int = 1 << 20) -> tuple[bytes, object]:
    out: list[bytes] = []
    reader = io.BytesIO(src)
    base = Base(base_path)
    try:
        stats = filter_stream(lambda n: reader.read(min(n, chunk)), out.append, base)
    finally:
        base.close()
    return b"".join(out), stats


def check_equivalent(src: bytes, filtered: bytes, base_path: Path) -> None:
    full = {BASE: bytearray(PAGES * PAGE_SIZE), ROM: bytearray(ROM_PAGES * PAGE_SIZE)}
    over = {BASE: bytearray(base_path.read_bytes()), ROM: bytearray(ROM_PAGES * PAGE_SIZE)}
    tail_full = load(src, full)
    tail_over = load(filtered, over)
    assert over == full
    assert tail_over == tail_full == DEVICES


def test_pages_the_base_holds_are_dropped_and_the_rest_kept(tmp_path: Path) -> None:
    base = make_base(tmp_path, {1: page(1), 2: page(2), 3: page(3), 4: page(0)})
    records = (
        data(0, page(9), BASE)  # base hole: kept
        + data(PAGE_SIZE, page(1))  # equal: dropped
        + data(2 * PAGE_SIZE, page(7))  # changed: kept
        + zero(3 * PAGE_SIZE)  # zeroed since the image: kept
        + b"".join(zero(n * PAGE_SIZE) for n in range(4, PAGES))  # zeros in the base: dropped
        + data(0, page(5), ROM)  # another block: always kept
    )
    src = stream(records)
    filtered, stats = run_filter(src, base)
    assert vars(stats) == {
        "pages_kept": 3, "pages_dropped": 1, "zeros_kept": 1, "zeros_dropped": PAGES - 4,
    }  # fmt: skip
    assert len(filtered) < len(src) - 4000
    check_equivalent(src, filtered, base)


def test_a_record_after_dropped_ones_names_its_block_again(tmp_path: Path) -> None:
    base = make_base(tmp_path, {0: page(1)})
    # ROM record, then a base page that is dropped, then a continued base page that is kept:
    # the kept one must carry "ram0" again (the loader's last block is still the ROM).
    records = data(0, page(4), ROM) + data(0, page(1), BASE) + data(PAGE_SIZE, page(2))
    filtered, _ = run_filter(stream(records), base)
    assert bytes([len(BASE)]) + BASE + page(2) in filtered
    check_equivalent(stream(records), filtered, base)


def test_random_streams_load_to_the_same_memory(tmp_path: Path) -> None:
    rng = random.Random(7)
    for trial in range(20):
        trial_dir = tmp_path / str(trial)
        trial_dir.mkdir()
        base_pages = {n: page(rng.randrange(1, 4)) for n in rng.sample(range(PAGES), 20)}
        base = make_base(trial_dir, base_pages)
        order = list(range(PAGES))
        if trial % 2:
            rng.shuffle(order)  # not consecutive: the zero-run fast path must not assume it
        parts: list[bytes] = []
        records = b""
        last: bytes | None = None
        for n in order:  # QEMU's first pass sends every page of every block
            blocks = [BASE, ROM] if n < ROM_PAGES else [BASE]
            rng.shuffle(blocks)
            for block in blocks:
                addr = n * PAGE_SIZE
                named = None if block == last else block
                last = block
                choice = rng.random()
                if choice < 0.5:
                    records += zero(addr, named)
                elif choice < 0.8 and block == BASE and n in base_pages:
                    records += data(addr, base_pages[n], named)
                else:
                    records += data(addr, page(rng.randrange(1, 9)), named)
            if rng.random() < 0.1:
                parts.append(records)
                records = b""
        parts.append(records)
        src = stream(*parts)
        for chunk in (7, 4105, 1 << 20):  # reads cut records anywhere
            filtered, _ = run_filter(src, base, chunk)
            check_equivalent(src, filtered, base)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s: s[:8] + b"\x09" + s[9:], "section type"),
        (lambda s: b"QEVX" + s[4:], "not a QEMU migration stream"),
        (lambda s: s[: len(s) // 2], "ended early"),
        (lambda s: s.replace(be64(PAGE_SIZE | 0x28), be64(PAGE_SIZE | 0x60), 1), "flags"),
    ],
)
def test_streams_it_cannot_rewrite_are_refused(
    tmp_path: Path, mutate: Callable[[bytes], bytes], reason: str
) -> None:
    base = make_base(tmp_path, {1: page(1)})
    src = stream(data(0, page(3), BASE) + data(PAGE_SIZE, page(2)))
    with pytest.raises(DeltaUnsupported, match=reason):
        run_filter(mutate(src), base)


def test_a_base_block_of_another_size_is_refused(tmp_path: Path) -> None:
    base = make_base(tmp_path, {})
    src = stream(zero(0, BASE), blocks=((BASE, 2 * PAGES * PAGE_SIZE),))
    with pytest.raises(DeltaUnsupported, match="not the size"):
        run_filter(src, base)


def test_a_second_iterable_section_is_refused(tmp_path: Path) -> None:
    base = make_base(tmp_path, {})
    src = stream(zero(0, BASE))
    start = src.index(b"\x01" + be32(2))
    other = b"\x01" + be32(9) + b"\x05block" + be32(0) + be32(1)
    with pytest.raises(DeltaUnsupported, match="besides RAM"):
        run_filter(src[:start] + other + src[start:], base)
