""".dockerignore with Docker's semantics (patterns, ``!`` exceptions, ``**``, parents)."""

from __future__ import annotations

from pathlib import Path

import pytest

from embervm.imagebuild.dockerignore import DockerIgnore

RULES = """
# comment
*.pyc
**/__pycache__
node_modules
!node_modules/keep.js
docs/**/*.md
!docs/README.md
/build
.git
secret?.txt
[abc].log
"""


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        ("a.pyc", True),
        ("src/a.pyc", False),  # `*` does not cross folders (unlike .gitignore)
        ("src/__pycache__/m.cpython.pyc", True),
        ("__pycache__/x", True),
        ("node_modules/lib/x.js", True),
        ("node_modules/keep.js", False),
        ("docs/c.md", True),  # `**/` matches zero folders
        ("docs/a/b/c.md", True),
        ("docs/README.md", False),
        ("build/out.bin", True),  # a pattern matching a parent excludes what is below
        ("src/build/out.bin", False),
        (".git/config", True),
        ("secret1.txt", True),
        ("secret12.txt", False),
        ("a.log", True),
        ("d.log", False),
        ("app.py", False),
    ],
)
def test_patterns_match_like_docker(path: str, excluded: bool) -> None:
    assert DockerIgnore.from_text(RULES).is_excluded(path) is excluded


def test_last_matching_pattern_wins() -> None:
    rules = DockerIgnore.from_text("*.md\n!README.md\nREADME.md\n")
    assert rules.is_excluded("README.md")
    assert not DockerIgnore.from_text("*.md\n!README.md\n").is_excluded("README.md")


def test_double_star_alone_excludes_everything_and_exception_reincludes() -> None:
    rules = DockerIgnore.from_text("**\n!app/**\n")
    assert rules.is_excluded("x/y")
    assert not rules.is_excluded("app/main.py")


def test_from_context_reads_the_file_or_is_empty(tmp_path: Path) -> None:
    assert not DockerIgnore.from_context(tmp_path).is_excluded("anything")
    (tmp_path / ".dockerignore").write_text("*.tmp\n")
    assert DockerIgnore.from_context(tmp_path).is_excluded("x.tmp")
