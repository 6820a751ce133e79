"""COPY/ADD source selection from the build context (Docker's rules) and its digest."""

from __future__ import annotations

from pathlib import Path

import pytest

from embervm.errors import BuildFailure
from embervm.imagebuild.context import BuildContext, digest_items
from embervm.imagebuild.dockerfile import parse_dockerfile
from embervm.imagebuild.plan import CopyStep

ARN = "arn:aws:lambda:us-east-1:aws:microvm-image:debian12"


def step(line: str, workdir: str = "/app") -> CopyStep:
    plan = parse_dockerfile(
        f"FROM embervm/debian12\nWORKDIR {workdir}\n{line}\nCMD x\n", base_image_arn=ARN
    )
    last = plan.steps[-1]
    assert isinstance(last, CopyStep)
    return last


@pytest.fixture
def ctx(tmp_path: Path) -> BuildContext:
    root = tmp_path / "ctx"
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "m.py").write_text("m")
    (root / "src" / "main.py").write_text("main")
    (root / "src" / "x.pyc").write_text("junk")
    (root / "requirements.txt").write_text("flask\n")
    (root / "app.py").write_text("app")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "Dockerfile").write_text("FROM embervm/debian12\n")
    (root / ".dockerignore").write_text("**/*.pyc\nsecret.txt\n")
    (root / "secret.txt").write_text("s")
    return BuildContext(root)


def paths(items: list) -> list[str]:  # type: ignore[type-arg]
    return sorted(i.guest_path for i in items)


def test_file_to_folder_and_file_to_file(ctx: BuildContext) -> None:
    assert paths(ctx.select(step("COPY app.py ./"))) == ["/app/app.py"]
    assert paths(ctx.select(step("COPY app.py /srv/main.py"))) == ["/srv/main.py"]


def test_folder_source_copies_its_contents_without_ignored_files(ctx: BuildContext) -> None:
    assert paths(ctx.select(step("COPY src/ /code/"))) == [
        "/code/main.py",
        "/code/pkg",
        "/code/pkg/m.py",
    ]


def test_dot_copies_the_whole_context_minus_dockerignore(ctx: BuildContext) -> None:
    got = paths(ctx.select(step("COPY . .")))
    assert "/app/secret.txt" not in got
    assert "/app/src/x.pyc" not in got
    assert "/app/Dockerfile" in got
    assert "/app/src/pkg/m.py" in got


def test_globs_match_per_segment(ctx: BuildContext) -> None:
    assert paths(ctx.select(step("COPY *.py *.txt ./"))) == ["/app/app.py", "/app/requirements.txt"]
    assert paths(ctx.select(step("COPY src/*.py ./"))) == ["/app/main.py"]


def test_modes_are_kept_unless_chmod(ctx: BuildContext) -> None:
    (item,) = ctx.select(step("COPY run.sh ./"))
    assert item.mode == 0o755
    (item,) = ctx.select(step("COPY --chmod=700 app.py ./"))
    assert item.mode == 0o700


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("COPY missing.txt ./", "not in the build context"),
        ("COPY secret.txt ./", "excluded by .dockerignore"),
        ("COPY *.nothing ./", "no files in the build context match"),
        ("COPY ../etc/passwd ./", "outside the build context"),
    ],
)
def test_bad_sources_name_the_line(ctx: BuildContext, line: str, why: str) -> None:
    with pytest.raises(BuildFailure, match=why) as err:
        ctx.select(step(line))
    assert "at line 3" in err.value.reason


def test_add_of_a_local_archive_is_refused(ctx: BuildContext) -> None:
    (ctx.root / "a.tar.gz").write_bytes(b"\x1f\x8b\x08\x00rest")
    with pytest.raises(BuildFailure, match="use COPY and `RUN tar -xf`"):
        BuildContext(ctx.root).select(step("ADD a.tar.gz /opt/"))
    assert paths(BuildContext(ctx.root).select(step("ADD app.py /opt/"))) == ["/opt/app.py"]


def test_digest_changes_with_content_mode_and_path(ctx: BuildContext) -> None:
    s = step("COPY . .")
    before = digest_items(ctx.select(s))
    assert digest_items(BuildContext(ctx.root).select(s)) == before
    (ctx.root / "app.py").write_text("app v2")
    assert digest_items(BuildContext(ctx.root).select(s)) != before
    (ctx.root / "app.py").write_text("app")
    (ctx.root / "app.py").chmod(0o600)
    assert digest_items(BuildContext(ctx.root).select(s)) != before


def test_dockerfile_is_readable_even_if_ignored(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM embervm/debian12\n")
    (tmp_path / ".dockerignore").write_text("Dockerfile\n")
    assert BuildContext(tmp_path).read_dockerfile().startswith("FROM")
    with pytest.raises(BuildFailure, match=r"no Dockerfile\.none"):
        BuildContext(tmp_path).read_dockerfile("Dockerfile.none")


def test_symlinks_in_a_context_folder_are_refused(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to("/etc/passwd")
    with pytest.raises(BuildFailure, match="symbolic link 'link'"):
        BuildContext(tmp_path)
