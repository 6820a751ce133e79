"""The object manifest of ``host.objects``: its values, its JSON, and the checks a reader makes.

A manifest comes from the object store, which other machines write: every field is checked
before anything is downloaded or written (names, sizes, extents, chunk references, backing
links), and anything unexpected is refused with ``SnapshotError``. The format is described in
``host/objects.py``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from embervm.errors import SnapshotError

FORMAT = "embervm-objects"
VERSION = 1
OBJECT_PREFIX = "objects/sha256/"
#: A manifest longer than this is refused unread (a 2 GiB RAM file with 50 000 extents: ~1 MiB).
MAX_MANIFEST_BYTES = 16 << 20
MAX_FILES = 4096
MAX_EXTENTS = 1 << 20  # over all files
MAX_CHUNK = 64 << 20
MAX_NAME_BYTES = 255
MAX_FILE_SIZE = 1 << 44  # 16 TiB: what ext4 allows for one file
_HEX = re.compile(r"[0-9a-f]{64}")

Role = Literal["disk", "layer", "base", "file"]
ROLES: tuple[str, ...] = get_args(Role)
"""``disk``: a qcow2 no other file of the set names as its backing file (the top of a chain);
``layer``: a qcow2 another file backs onto; ``base``: a file that is not qcow2 (raw) another
backs onto; ``file``: anything else (device state, RAM file, the snapshot's own manifest)."""


@dataclass(frozen=True)
class ChunkRef:
    """One object, ``objects/sha256/<sha256>``: ``length`` bytes of a file's data stream."""

    sha256: str
    length: int

    @property
    def key(self) -> str:
        return object_key(self.sha256)


@dataclass(frozen=True)
class ObjectFile:
    """One file: its logical ``size``, the ``extents`` (offset, length) holding data (the rest
    reads as zeros), and the ``chunks`` whose concatenation is the extents' bytes in order."""

    name: str
    size: int
    mode: int
    mtime_ns: int
    sha256: str  # of the whole logical file, holes included (as ``sha256sum`` would say)
    role: Role = "file"
    backing: str | None = None  # a qcow2's backing file: another file's name, or an external one
    extents: tuple[tuple[int, int], ...] = ()
    chunks: tuple[ChunkRef, ...] = ()

    @property
    def data_bytes(self) -> int:
        return sum(length for _, length in self.extents)


@dataclass(frozen=True)
class ObjectManifest:
    """A published set of files (see ``host/objects.py``)."""

    files: tuple[ObjectFile, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    external: tuple[str, ...] = ()  # backing files the fetcher supplies (``fetch(external=)``)
    version: int = VERSION

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def data_bytes(self) -> int:
        return sum(f.data_bytes for f in self.files)

    def chunks(self) -> dict[str, int]:
        """Every object the manifest needs, once: sha256 → length."""
        return {c.sha256: c.length for f in self.files for c in f.chunks}

    def file(self, name: str) -> ObjectFile:
        for entry in self.files:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def to_json(self) -> bytes:
        body = self._body()
        body["manifest_sha256"] = _digest(body)
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def _body(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": self.version,
            "meta": self.meta,
            "external": list(self.external),
            "files": [_file_body(f) for f in self.files],
        }


def _file_body(f: ObjectFile) -> dict[str, Any]:
    return {
        "name": f.name, "size": f.size, "mode": f.mode, "mtime_ns": f.mtime_ns,
        "sha256": f.sha256, "role": f.role, "backing": f.backing,
        "extents": [list(e) for e in f.extents],
        "chunks": [[c.sha256, c.length] for c in f.chunks],
    }  # fmt: skip


def object_key(sha256: str) -> str:
    return OBJECT_PREFIX + sha256


def check_name(name: object, what: str = "file name") -> str:
    """A plain file name: no ``/``, not ``.`` or ``..``, no NUL, at most 255 bytes."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise SnapshotError(f"{what} {str(name)[:80]!r} is not a plain file name")
    try:
        encoded = name.encode()
    except UnicodeEncodeError as exc:  # lone surrogates
        raise SnapshotError(f"{what} {name[:80]!r} is not valid UTF-8") from exc
    if len(encoded) > MAX_NAME_BYTES:
        raise SnapshotError(f"{what} {name[:80]!r}... is longer than {MAX_NAME_BYTES} bytes")
    return name


def check_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``meta`` as a plain dict that survives a JSON round trip unchanged."""
    try:
        plain: dict[str, Any] = json.loads(json.dumps(dict(meta), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise SnapshotError(f"manifest meta is not plain JSON: {exc}") from exc
    return plain


def _digest(body: Mapping[str, Any]) -> str:
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canon).hexdigest()


def parse_manifest(data: bytes, *, where: str) -> ObjectManifest:
    """Parse and check a manifest; ``SnapshotError`` naming ``where`` and the problem."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise SnapshotError(f"object manifest {where} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        body = json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"object manifest {where} is not valid JSON: {exc}") from exc
    try:
        return _from_body(body)
    except _Bad as exc:
        raise SnapshotError(f"object manifest {where} is refused: {exc}") from None


class _Bad(Exception):
    """A manifest field that is not what this reader accepts (message: which and why)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:80]!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _from_body(body: Any) -> ObjectManifest:
    if not isinstance(body, dict):
        raise _Bad("not a JSON object")
    if body.get("format") != FORMAT or body.get("version") != VERSION:
        raise _Bad(
            f"format {str(body.get('format'))[:40]!r} version {str(body.get('version'))[:20]}; "
            f"this Embervm reads {FORMAT} version {VERSION}"
        )
    claimed = body.pop("manifest_sha256", None)
    if claimed != _digest(body):
        raise _Bad("checksum mismatch (manifest_sha256)")
    if set(body) != {"format", "version", "meta", "external", "files"}:
        raise _Bad(f"unexpected fields {sorted(body)[:10]}")
    meta, external, raw_files = body["meta"], body["external"], body["files"]
    if not isinstance(meta, dict):
        raise _Bad("meta is not an object")
    if not isinstance(external, list) or not isinstance(raw_files, list):
        raise _Bad("external and files must be lists")
    if len(raw_files) > MAX_FILES:
        raise _Bad(f"more than {MAX_FILES} files")
    externals = tuple(_name(n, "external name") for n in external)
    files = tuple(_file(raw) for raw in raw_files)
    names = [f.name for f in files]
    if len(set(names) | set(externals)) != len(names) + len(externals):
        raise _Bad("a name appears twice (among files and external names)")
    if sum(len(f.extents) for f in files) > MAX_EXTENTS:
        raise _Bad(f"more than {MAX_EXTENTS} extents")
    _check_chunk_lengths(files)
    _check_backing(files, externals)
    return ObjectManifest(files=files, meta=meta, external=externals)


def _name(value: Any, what: str) -> str:
    try:
        return check_name(value, what)
    except SnapshotError as exc:
        raise _Bad(str(exc)) from None


def _int(value: Any, what: str, *, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:  # bool is an int: refused too
        raise _Bad(f"{what} {str(value)[:40]} is not an integer in [{low}, {high}]")
    return value


def _hex(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        raise _Bad(f"{what} {str(value)[:80]!r} is not a lowercase sha256 hex digest")
    return value


def _file(raw: Any) -> ObjectFile:
    if not isinstance(raw, dict):
        raise _Bad("a file entry is not an object")
    expected = {"name", "size", "mode", "mtime_ns", "sha256", "role", "backing", "extents",
                "chunks"}  # fmt: skip
    if set(raw) != expected:
        raise _Bad(f"file entry fields {sorted(raw)[:12]} are not {sorted(expected)}")
    name = _name(raw["name"], "file name")
    size = _int(raw["size"], f"{name}: size", low=0, high=MAX_FILE_SIZE)
    mode = _int(raw["mode"], f"{name}: mode", low=0, high=0o777)  # no setuid, setgid, sticky
    mtime_ns = _int(raw["mtime_ns"], f"{name}: mtime_ns", low=0, high=1 << 63)
    digest = _hex(raw["sha256"], f"{name}: sha256")
    role = raw["role"]
    if role not in ROLES:
        raise _Bad(f"{name}: role {str(role)[:40]!r} is not one of {', '.join(ROLES)}")
    backing = None if raw["backing"] is None else _name(raw["backing"], f"{name}: backing")
    extents = _extents(raw["extents"], name, size)
    chunks = _chunks(raw["chunks"], name)
    if sum(c.length for c in chunks) != sum(n for _, n in extents):
        raise _Bad(f"{name}: the chunks do not add up to the extents' bytes")
    return ObjectFile(name, size, mode, mtime_ns, digest, role, backing, extents, chunks)


def _extents(raw: Any, name: str, size: int) -> tuple[tuple[int, int], ...]:
    if not isinstance(raw, list) or len(raw) > MAX_EXTENTS:
        raise _Bad(f"{name}: extents must be a list of at most {MAX_EXTENTS}")
    out: list[tuple[int, int]] = []
    end = 0
    for item in raw:
        if not isinstance(item, list) or len(item) != 2:
            raise _Bad(f"{name}: an extent is not [offset, length]")
        offset = _int(item[0], f"{name}: extent offset", low=0, high=MAX_FILE_SIZE)
        length = _int(item[1], f"{name}: extent length", low=1, high=MAX_FILE_SIZE)
        if offset < end:
            raise _Bad(f"{name}: extent at {offset} overlaps the one before or is out of order")
        end = offset + length
        if end > size:
            raise _Bad(f"{name}: extent [{offset}, {end}) goes past the size {size}")
        out.append((offset, length))
    return tuple(out)


def _chunks(raw: Any, name: str) -> tuple[ChunkRef, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_EXTENTS:
        raise _Bad(f"{name}: chunks must be a list of at most {MAX_EXTENTS}")
    out: list[ChunkRef] = []
    for item in raw:
        if not isinstance(item, list) or len(item) != 2:
            raise _Bad(f"{name}: a chunk is not [sha256, length]")
        digest = _hex(item[0], f"{name}: chunk")
        out.append(ChunkRef(digest, _int(item[1], f"{name}: chunk length", low=1, high=MAX_CHUNK)))
    return tuple(out)


def _check_chunk_lengths(files: tuple[ObjectFile, ...]) -> None:
    seen: dict[str, int] = {}
    for f in files:
        for c in f.chunks:
            if seen.setdefault(c.sha256, c.length) != c.length:
                raise _Bad(f"chunk {c.sha256} is listed with two lengths")


def _check_backing(files: tuple[ObjectFile, ...], externals: tuple[str, ...]) -> None:
    """Backing links name files of the set (or external names); roles agree with the links;
    no chain loops."""
    by_name = {f.name: f for f in files}
    backed = {f.backing for f in files if f.backing is not None}
    for f in files:
        if f.backing is not None:
            if f.backing not in by_name and f.backing not in externals:
                raise _Bad(f"{f.name}: backing file {f.backing!r} is not in the manifest")
            if f.role not in ("disk", "layer"):
                raise _Bad(f"{f.name}: has a backing file but its role is {f.role}")
        if f.name in backed and f.role not in ("layer", "base"):
            raise _Bad(f"{f.name}: is a backing file but its role is {f.role}")
        if f.name not in backed and f.role in ("layer", "base"):
            raise _Bad(f"{f.name}: role {f.role} but no file backs onto it")
    for f in files:
        seen = {f.name}
        current = f.backing
        while current is not None and current in by_name:
            if current in seen:
                raise _Bad(f"{f.name}: its backing chain loops through {current!r}")
            seen.add(current)
            current = by_name[current].backing
