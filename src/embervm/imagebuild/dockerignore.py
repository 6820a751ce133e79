"""``.dockerignore`` with Docker's semantics (moby/patternmatcher).

Patterns are cleaned like Go's ``filepath.Clean`` (a leading ``/`` dropped), ``*`` matches
within one path segment, ``?`` one character, ``**`` any number of segments (including none),
``[...]`` a class, ``\\`` escapes; ``!pattern`` re-includes; the last matching pattern wins;
a pattern that matches a parent folder excludes everything below it. Lines starting with ``#``
are comments.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

from embervm.errors import BuildFailure
from embervm.imagebuild.glob import Glob, GlobError


@dataclass(frozen=True)
class _Pattern:
    text: str
    glob: Glob
    exclusion: bool

    def match(self, path: str) -> bool:
        return self.glob.match(path)


def _clean(pattern: str) -> str:
    cleaned = posixpath.normpath(pattern)
    if cleaned.startswith("//"):
        cleaned = cleaned[1:]
    cleaned = cleaned.lstrip("/") or "."
    return cleaned


def _compile(pattern: str) -> Glob:
    try:
        return Glob(pattern, globstar=True)
    except GlobError as exc:
        raise BuildFailure(f".dockerignore pattern {pattern!r} is invalid: {exc}") from exc


class DockerIgnore:
    """The compiled patterns of one ``.dockerignore``."""

    def __init__(self, lines: list[str]) -> None:
        self.patterns: list[_Pattern] = []
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exclusion = line.startswith("!")
            if exclusion:
                line = line[1:].strip()
                if not line:
                    raise BuildFailure(".dockerignore has an illegal exclusion pattern '!'")
            cleaned = _clean(line)
            self.patterns.append(_Pattern(cleaned, _compile(cleaned), exclusion))

    @classmethod
    def from_text(cls, text: str) -> DockerIgnore:
        return cls(text.splitlines())

    @classmethod
    def from_context(cls, context: Path) -> DockerIgnore:
        """The context's ``.dockerignore``, or an empty one."""
        path = context / ".dockerignore"
        if not path.is_file():
            return cls([])
        return cls.from_text(path.read_text(encoding="utf-8", errors="replace"))

    def is_excluded(self, rel_path: str) -> bool:
        """True when ``rel_path`` (slash-separated, relative to the context) is excluded."""
        path = _clean(rel_path)
        parents = path.split("/")[:-1]
        matched = False
        for pattern in self.patterns:
            if pattern.exclusion != matched:
                continue
            hit = pattern.match(path)
            if not hit:
                for i in range(len(parents)):
                    if pattern.match("/".join(parents[: i + 1])):
                        hit = True
                        break
            if hit:
                matched = not pattern.exclusion
        return matched
