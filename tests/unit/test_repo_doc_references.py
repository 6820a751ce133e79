"""The repository cites only documents it holds.

Code and docs once cited design notes kept outside the repository ("DESIGN §7", "REFERENCE.md",
"SPIKE.md recipe"), which a user of the repository cannot read; the facts they relied on are
stated in ``docs/*.md`` and README.md now. These tests fail, listing ``file:line``, when a
tracked text file cites such a note again or names a ``docs/<NAME>.md`` that is not in the
repository.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SELF = Path(__file__).resolve().relative_to(ROOT).as_posix()

#: What is scanned: tracked files under these directories, and these files.
SCANNED = ("src/", "docs/", "README.md", "scripts/", ".ci/", "Makefile", "pyproject.toml")
#: Scanned for citations of outside notes only: tests hold made-up ``docs/…`` paths as data
#: (a .dockerignore's patterns, for one).
NOTES_ONLY_SCANNED = ("tests/", "bench/")

#: Citations of the design notes outside the repository.
OUTSIDE_NOTE = re.compile(
    r"DESIGN §|DESIGN\.md|REFERENCE\.md|SPIKE\.md|SPIKE recipe|STYLE\.md|shared/DESIGN"
)
#: A repository doc named by path (not a path that merely ends in ``docs/…``, nor a glob).
DOC_MENTION = re.compile(r"(?<![\w./-])docs/([\w.-]+\.md)\b")


def _tracked(paths: Iterable[str]) -> list[str]:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing tells tracked files apart")
    out = subprocess.run(
        ["git", "ls-files", "-z", "--", *paths],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    return sorted(name for name in out.decode().split("\0") if name)


def _text_lines(rel: str) -> list[str]:
    """The file's lines; none for a binary file or one missing from the work tree."""
    path = ROOT / rel
    if not path.is_file():
        return []
    data = path.read_bytes()
    if b"\0" in data:
        return []
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return []


Reader = Callable[[str], list[str]]


def outside_note_citations(files: Iterable[str], read: Reader = _text_lines) -> list[str]:
    found = []
    for rel in files:
        if rel == SELF:
            continue
        for number, line in enumerate(read(rel), start=1):
            if OUTSIDE_NOTE.search(line):
                found.append(f"{rel}:{number}: {line.strip()}")
    return found


def missing_doc_mentions(
    files: Iterable[str], docs: set[str], read: Reader = _text_lines
) -> list[str]:
    found = []
    for rel in files:
        if rel == SELF:
            continue
        for number, line in enumerate(read(rel), start=1):
            for match in DOC_MENTION.finditer(line):
                if f"docs/{match[1]}" not in docs:
                    found.append(f"{rel}:{number}: docs/{match[1]} is not in the repository")
    return found


def test_nothing_cites_design_notes_outside_the_repository() -> None:
    found = outside_note_citations(_tracked(SCANNED + NOTES_ONLY_SCANNED))
    assert not found, (
        "cite the repository's docs (docs/*.md, README.md) instead, stating there the fact "
        "relied on:\n" + "\n".join(found)
    )


def test_every_docs_path_mentioned_is_in_the_repository() -> None:
    docs = set(_tracked(["docs/"]))
    assert docs, "no tracked docs/ at all"
    found = missing_doc_mentions(_tracked(SCANNED), docs)
    assert not found, "\n".join(found)


def test_the_scanners_report_what_they_are_for() -> None:
    """Planted defects are found, with file and line; look-alikes are not."""
    lines = {
        "a.py": ["ok", "one vCPU per 2 GiB (DESIGN §7)", "see SPIKE.md"],
        "b.md": ["`docs/API.md` and `docs/NOPE.md`", "src/x/docs/Y.md, docs/*.md"],
        "c.md": ["private/shared/loopback ranges; docs.aws.amazon.com/lambda/"],
    }
    assert outside_note_citations(lines, lines.__getitem__) == [
        "a.py:2: one vCPU per 2 GiB (DESIGN §7)",
        "a.py:3: see SPIKE.md",
    ]
    assert missing_doc_mentions(lines, {"docs/API.md"}, lines.__getitem__) == [
        "b.md:1: docs/NOPE.md is not in the repository"
    ]
