"""The build context: the unpacked zip, filtered by ``.dockerignore``, as COPY/ADD sees it.

``select`` turns one COPY/ADD step into the list of files and folders to place in the guest,
with Docker's rules: a folder source copies its contents; a file goes to ``dest`` or, when
``dest`` ends in ``/``, into it; globs use Go's ``filepath.Match`` per path segment; nothing
outside the context is reachable. ``digest`` hashes what was selected (paths, modes, content)
for the step's cache key.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from embervm.errors import BuildFailure
from embervm.imagebuild.dockerignore import DockerIgnore
from embervm.imagebuild.glob import Glob, GlobError
from embervm.imagebuild.plan import CopyStep

_GLOB = re.compile(r"[*?\[]")
_ARCHIVE_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")
_HASH_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class CopyItem:
    """One thing to create in the guest: a folder, or a file from the context or a heredoc."""

    guest_path: str
    is_dir: bool
    mode: int
    source: Path | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class _Entry:
    rel: str
    path: Path
    is_dir: bool
    mode: int


def _segment_glob(segment: str) -> Glob:
    """Go ``filepath.Match`` for one segment: ``*`` ``?`` ``[...]`` and ``\\`` escapes."""
    try:
        return Glob(segment)
    except GlobError as exc:
        raise BuildFailure(f"bad pattern {segment!r}: {exc}") from exc


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class BuildContext:
    """The files a Dockerfile's COPY/ADD may use."""

    def __init__(self, root: Path, ignore: DockerIgnore | None = None) -> None:
        self.root = root
        self.ignore = ignore if ignore is not None else DockerIgnore.from_context(root)
        self._entries = self._scan()
        self._by_rel = {e.rel: e for e in self._entries}

    def _scan(self) -> list[_Entry]:
        entries: list[_Entry] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                full = Path(dirpath) / name
                rel = full.relative_to(self.root).as_posix()
                st = full.lstat()
                if stat.S_ISLNK(st.st_mode):
                    raise BuildFailure(f"the build context has a symbolic link {rel!r}")
                if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                    raise BuildFailure(f"the build context has a special file {rel!r}")
                if self.ignore.is_excluded(rel):
                    continue
                entries.append(_Entry(rel, full, stat.S_ISDIR(st.st_mode), st.st_mode & 0o777))
        return entries

    def read_dockerfile(self, name: str = "Dockerfile", max_bytes: int = 1024 * 1024) -> str:
        """The Dockerfile's text (read even if .dockerignore lists it, as Docker does)."""
        path = self.root / name
        if not path.is_file():
            raise BuildFailure(f"the code artifact has no {name} at its top level")
        data = path.read_bytes()
        if len(data) > max_bytes:
            raise BuildFailure(f"the {name} is larger than {max_bytes} bytes")
        return data.decode("utf-8", errors="replace")

    def _matches(self, pattern: str) -> list[_Entry]:
        segments = [_segment_glob(s) for s in pattern.split("/")]
        hits = []
        for entry in self._entries:
            parts = entry.rel.split("/")
            if len(parts) == len(segments) and all(
                glob.match(p) for glob, p in zip(segments, parts, strict=True)
            ):
                hits.append(entry)
        return hits

    def _below(self, folder: str) -> list[_Entry]:
        if folder == ".":
            return list(self._entries)
        prefix = folder + "/"
        return [e for e in self._entries if e.rel.startswith(prefix)]

    def _source(self, step: CopyStep, raw: str) -> tuple[list[_Entry], bool]:
        """Entries for one source and whether it was a glob."""
        cleaned = posixpath.normpath("/" + raw).lstrip("/") or "."
        if posixpath.normpath(raw.lstrip("/") or ".").startswith(".."):
            raise BuildFailure(
                f"`{step.text}` at line {step.line}: {raw!r} is outside the build context"
            )
        if _GLOB.search(cleaned):
            hits = self._matches(cleaned)
            if not hits:
                raise BuildFailure(
                    f"`{step.text}` at line {step.line}: no files in the build context match "
                    f"{raw!r}"
                )
            return hits, True
        if cleaned == ".":
            return [_Entry(".", self.root, True, 0o755)], False
        entry = self._by_rel.get(cleaned)
        if entry is None:
            raise BuildFailure(
                f"`{step.text}` at line {step.line}: {raw!r} is not in the build context "
                "(missing from the zip, or excluded by .dockerignore)"
            )
        return [entry], False

    def select(self, step: CopyStep, into_dir: bool | None = None) -> list[CopyItem]:
        """What ``step`` places in the guest (heredoc and context sources; not URLs).

        ``into_dir`` overrides the trailing-slash rule when the destination is known to be an
        existing folder in the image."""
        items: list[CopyItem] = []
        dest = step.dest
        into_dir = dest.endswith("/") if into_dir is None else into_dir
        base = dest.rstrip("/") or "/"
        for raw in step.sources:
            entries, _ = self._source(step, raw)
            for entry in entries:
                if entry.is_dir:
                    for child in self._below(entry.rel):
                        rel = child.rel if entry.rel == "." else child.rel[len(entry.rel) + 1 :]
                        items.append(self._item(step, posixpath.join(base, rel), child))
                    continue
                target = posixpath.join(base, posixpath.basename(entry.rel)) if into_dir else base
                self._refuse_archive(step, entry)
                items.append(self._item(step, target, entry))
        for doc in step.inline:
            target = posixpath.join(base, doc.name) if into_dir else base
            mode = step.chmod if step.chmod is not None else doc.mode
            items.append(CopyItem(target, False, mode, data=doc.content))
        return items

    @staticmethod
    def _item(step: CopyStep, guest_path: str, entry: _Entry) -> CopyItem:
        mode = step.chmod if step.chmod is not None else entry.mode
        if entry.is_dir:
            return CopyItem(guest_path, True, mode)
        return CopyItem(guest_path, False, mode, source=entry.path)

    @staticmethod
    def _refuse_archive(step: CopyStep, entry: _Entry) -> None:
        """ADD would unpack local archives; we refuse instead of guessing (docs/BUILDS.md)."""
        if step.kind != "ADD":
            return
        with entry.path.open("rb") as fh:
            head = fh.read(512)
        if head.startswith(_ARCHIVE_MAGIC) or head[257:262] == b"ustar":
            raise BuildFailure(
                f"`{step.text}` at line {step.line}: ADD of the archive {entry.rel!r} is not "
                "supported; use COPY and `RUN tar -xf` instead"
            )


def digest_items(items: list[CopyItem]) -> str:
    """sha256 over the selected paths, kinds, modes and content hashes (the COPY inputs)."""
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda i: i.guest_path):
        if item.is_dir:
            content = "dir"
        elif item.source is not None:
            content = _file_sha256(item.source)
        else:
            content = hashlib.sha256(item.data or b"").hexdigest()
        digest.update(f"{item.guest_path}\0{item.mode:o}\0{content}\n".encode())
    return digest.hexdigest()
