"""safe_extract refuses every way out of the extraction root and every kind of bomb."""

from __future__ import annotations

import contextlib
import stat
import struct
import tracemalloc
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from embervm.errors import BuildFailure
from embervm.imagebuild.unzip import safe_extract


def make_zip(path: Path, entries: Sequence[tuple[str | zipfile.ZipInfo, bytes]], **kw: int) -> Path:
    with zipfile.ZipFile(path, "w", compression=kw.get("compression", zipfile.ZIP_DEFLATED)) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def info(name: str, mode: int) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name)
    zi.external_attr = mode << 16
    return zi


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != "a.zip")


def test_extracts_files_folders_and_modes(tmp_path: Path) -> None:
    z = make_zip(
        tmp_path / "a.zip",
        [
            ("Dockerfile", b"FROM embervm/debian12\n"),
            ("app/", b""),
            (info("app/run.sh", stat.S_IFREG | 0o4755), b"#!/bin/sh\n"),
            ("./app/./data.txt", b"data"),
        ],
    )
    out = safe_extract(z, tmp_path / "ctx")
    assert (out / "Dockerfile").read_bytes() == b"FROM embervm/debian12\n"
    assert (out / "app" / "data.txt").read_bytes() == b"data"
    assert stat.S_IMODE((out / "app" / "run.sh").stat().st_mode) == 0o755  # setuid dropped


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../evil.txt", "'..'"),
        ("app/../../evil.txt", "'..'"),
        ("/etc/evil", "absolute"),
        ("C:/evil", "absolute"),
        ("..\\evil.txt", "'..'"),
    ],
)
def test_refuses_paths_leaving_the_root(tmp_path: Path, name: str, why: str) -> None:
    z = make_zip(tmp_path / "a.zip", [("ok.txt", b"x"), (name, b"evil")])
    with pytest.raises(BuildFailure, match=why):
        safe_extract(z, tmp_path / "ctx")
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "evil.txt").exists()


def test_refuses_symlinks_even_pointing_inside(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "a.zip", [(info("link", stat.S_IFLNK | 0o777), b"ok.txt")])
    with pytest.raises(BuildFailure, match="symbolic link"):
        safe_extract(z, tmp_path / "ctx")
    assert leftovers(tmp_path) == []


def test_refuses_symlink_pointing_outside(tmp_path: Path) -> None:
    z = make_zip(
        tmp_path / "a.zip",
        [(info("out", stat.S_IFLNK | 0o777), b"/etc/passwd"), ("out/x", b"y")],
    )
    with pytest.raises(BuildFailure, match="symbolic link"):
        safe_extract(z, tmp_path / "ctx")


@pytest.mark.parametrize("kind", [stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK])
def test_refuses_device_and_special_files(tmp_path: Path, kind: int) -> None:
    z = make_zip(tmp_path / "a.zip", [(info("dev", kind | 0o600), b"")])
    with pytest.raises(BuildFailure, match="device, FIFO or socket"):
        safe_extract(z, tmp_path / "ctx")


def test_refuses_zip_bomb_by_ratio_while_streaming(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "a.zip", [("zeros", b"\0" * (20 * 1024 * 1024))])
    with pytest.raises(BuildFailure, match="zip bomb"):
        safe_extract(z, tmp_path / "ctx", max_ratio=50)
    assert leftovers(tmp_path) == []


def test_entry_whose_header_lies_about_its_size_is_refused(tmp_path: Path) -> None:
    """A header claiming 1 byte for 8 MiB never gets 8 MiB written: refused, nothing left."""
    z = make_zip(tmp_path / "a.zip", [("zeros", b"\0" * (8 * 1024 * 1024))])
    data = bytearray(z.read_bytes())
    # lie in both headers: claim a 1-byte uncompressed size
    with zipfile.ZipFile(z) as zf:
        real = zf.infolist()[0].file_size
    data = data.replace(real.to_bytes(4, "little"), (1).to_bytes(4, "little"))
    z.write_bytes(bytes(data))
    with pytest.raises(BuildFailure):
        safe_extract(z, tmp_path / "ctx", max_total_bytes=1024 * 1024)
    assert leftovers(tmp_path) == []


def test_refuses_too_many_files(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "a.zip", [(f"f{i}", b"x") for i in range(11)])
    with pytest.raises(BuildFailure, match="more than 10 entries"):
        safe_extract(z, tmp_path / "ctx", max_files=10)


def test_refuses_too_large_total(tmp_path: Path) -> None:
    entries = [(f"f{i}", bytes(range(256)) * 400) for i in range(5)]
    z = make_zip(tmp_path / "a.zip", entries, compression=zipfile.ZIP_STORED)
    with pytest.raises(BuildFailure, match="more than 300000 bytes"):
        safe_extract(z, tmp_path / "ctx", max_total_bytes=300_000)
    assert leftovers(tmp_path) == []


def test_refuses_duplicate_entries(tmp_path: Path) -> None:
    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a", b"1")
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("a", b"2")
    with pytest.raises(BuildFailure, match="more than once"):
        safe_extract(z, tmp_path / "ctx")


def test_refuses_non_zip(tmp_path: Path) -> None:
    z = tmp_path / "a.zip"
    z.write_bytes(b"not a zip at all")
    with pytest.raises(BuildFailure, match="not a valid zip"):
        safe_extract(z, tmp_path / "ctx")
    assert leftovers(tmp_path) == []


def directory_bomb(path: Path, entries: int, *, declared: int | None = None) -> Path:
    """The audit's §D.4 archive: nothing but minimal central-directory records (no files),
    then a ZIP64 end record and locator, and a classic end record pointing at them."""
    record = struct.pack(
        "<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0
    )
    names = (b"%c" % (65 + i % 26) for i in range(entries))
    with path.open("wb") as fh:
        for name in names:
            fh.write(record + name)
        size = fh.tell()
        count = entries if declared is None else declared
        zip64_at = fh.tell()
        fh.write(struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, size, 0))
        fh.write(struct.pack("<4sLQL", b"PK\x06\x07", 0, zip64_at, 1))
        fh.write(
            struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
        )
    return path


def peak_bytes_of(call: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        with contextlib.suppress(BuildFailure):
            call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_huge_central_directory_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    z = directory_bomb(tmp_path / "a.zip", 200_000)
    assert z.stat().st_size > 9_000_000
    peak = peak_bytes_of(lambda: safe_extract(z, tmp_path / "ctx"))
    assert peak < 20 * 1024 * 1024  # zipfile.ZipFile held 73 MiB here (~370 B per record)
    with pytest.raises(BuildFailure, match="more than 100000 entries"):
        safe_extract(z, tmp_path / "ctx")
    assert leftovers(tmp_path) == []


def test_records_are_counted_whatever_the_end_record_declares(tmp_path: Path) -> None:
    z = directory_bomb(tmp_path / "a.zip", 200_000, declared=1)
    peak = peak_bytes_of(lambda: safe_extract(z, tmp_path / "ctx"))
    with pytest.raises(BuildFailure, match="entries"):
        safe_extract(z, tmp_path / "ctx")
    assert peak < 20 * 1024 * 1024
    assert leftovers(tmp_path) == []


def test_a_central_directory_over_its_byte_cap_is_refused(tmp_path: Path) -> None:
    z = directory_bomb(tmp_path / "a.zip", 1_000)
    with pytest.raises(BuildFailure, match="central directory is 47000 bytes; the limit is 4096"):
        safe_extract(z, tmp_path / "ctx", max_directory_bytes=4096)


def test_an_archive_with_a_comment_and_a_zip64_entry_still_extracts(tmp_path: Path) -> None:
    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w", allowZip64=True) as zf:
        with zf.open("big.txt", "w", force_zip64=True) as fh:
            fh.write(b"zip64 entry")
        zf.writestr("Dockerfile", b"FROM embervm/debian12\n")
        zf.comment = b"a comment moves the end record"
    out = safe_extract(z, tmp_path / "ctx")
    assert (out / "big.txt").read_bytes() == b"zip64 entry"
