"""Globs from image authors: Docker's syntax, matched in time linear in pattern and path (A3)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from embervm.imagebuild.glob import MAX_PATTERN, Glob, GlobError

#: The audit's pattern: exponential for a backtracking regex against 255 'a's.
EVIL = "*a" * 15 + "*b"


@pytest.mark.parametrize(
    ("pattern", "path", "globstar", "expected"),
    [
        ("*.py", "a.py", False, True),
        ("*.py", "a/b.py", False, False),
        ("a?c", "abc", False, True),
        ("a?c", "a/c", False, False),
        ("[a-c]x", "bx", False, True),
        ("[^a-c]x", "bx", False, False),
        ("[!a]x", "bx", False, True),
        ("[\\-]", "-", False, True),
        ("\\*", "*", False, True),
        ("\\*", "a", False, False),
        ("**", "a/b/c", True, True),
        ("**/x", "x", True, True),
        ("**/x", "a/b/x", True, True),
        ("**/x", "ax", True, False),
        ("a/**/b", "a/b", True, True),
        ("a/**/b", "a/x/y/b", True, True),
        ("a/**/b", "a/xb", True, False),
        (EVIL, "a" * 255, False, False),
        (EVIL, "a" * 254 + "b", False, True),
    ],
)
def test_docker_glob_syntax(pattern: str, path: str, globstar: bool, expected: bool) -> None:
    assert Glob(pattern, globstar=globstar).match(path) is expected


def test_malformed_and_oversized_patterns_are_refused() -> None:
    with pytest.raises(GlobError, match="unclosed"):
        Glob("[abc")
    with pytest.raises(GlobError, match="range"):
        Glob("[z-a]")
    with pytest.raises(GlobError, match="longer"):
        Glob("a" * (MAX_PATTERN + 1))


def _finishes(code: str) -> bool:
    """Run ``code`` in a fresh interpreter; False if it has not finished in 60 s."""
    try:
        subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, timeout=60)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_copy_sources_with_an_evil_glob_finish(tmp_path: object) -> None:
    # Before the fix the pattern became a backtracking regex that held the GIL for hours.
    assert _finishes(f"""
        import pathlib, tempfile
        from embervm.imagebuild.context import BuildContext
        from embervm.imagebuild.dockerfile import parse_dockerfile
        root = pathlib.Path(tempfile.mkdtemp())
        (root / ("a" * 200)).write_text("x")
        ctx = BuildContext(root)
        plan = parse_dockerfile(
            "FROM embervm/debian12\\nCOPY {EVIL} /x/\\nCMD x\\n",
            base_image_arn="arn:aws:lambda:us-east-1:aws:microvm-image:debian12",
        )
        try:
            ctx.select(plan.steps[-1])
        except Exception as exc:
            assert "no file" in str(exc).lower() or "match" in str(exc).lower(), exc
    """)


def test_dockerignore_with_an_evil_line_finishes() -> None:
    assert _finishes(f"""
        from embervm.imagebuild.dockerignore import DockerIgnore
        assert not DockerIgnore.from_text("{EVIL}").is_excluded("a" * 255)
    """)
