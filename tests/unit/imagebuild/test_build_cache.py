"""Step cache keys: stable, and invalidated exactly from the first changed step on."""

from __future__ import annotations

from pathlib import Path

from embervm.imagebuild.cache import (
    LayerRef,
    LocalLayerCache,
    base_key,
    describe_step,
    step_key,
)
from embervm.imagebuild.context import BuildContext, digest_items
from embervm.imagebuild.dockerfile import parse_dockerfile
from embervm.imagebuild.plan import CopyStep

ARN = "arn:aws:lambda:us-east-1:aws:microvm-image:debian12"
DOCKERFILE = """FROM embervm/debian12
WORKDIR /app
COPY requirements.txt .
RUN python3 -m venv /venv && /venv/bin/pip install -r requirements.txt
COPY app.py .
ENV PORT=8080
RUN echo built
CMD ["/venv/bin/python", "app.py"]
"""


def keys(root: Path, text: str = DOCKERFILE, *, egress: bool = False) -> list[str]:
    plan = parse_dockerfile(text, base_image_arn=ARN, egress=egress)
    ctx = BuildContext(root)
    key = base_key("debian12", LayerRef("base-1"))
    out = []
    for step in plan.steps:
        digest = digest_items(ctx.select(step)) if isinstance(step, CopyStep) else ""
        key = step_key(key, *describe_step(step, egress=egress, copy_digest=digest))
        out.append(key)
    return out


def context(tmp_path: Path) -> Path:
    (tmp_path / "requirements.txt").write_text("flask\n")
    (tmp_path / "app.py").write_text("print('v1')\n")
    return tmp_path


def test_keys_are_stable(tmp_path: Path) -> None:
    root = context(tmp_path)
    assert keys(root) == keys(root)
    assert len(set(keys(root))) == 5


def test_app_change_invalidates_from_its_copy_on(tmp_path: Path) -> None:
    root = context(tmp_path)
    before = keys(root)
    (root / "app.py").write_text("print('v2')\n")
    after = keys(root)
    assert after[:3] == before[:3]  # WORKDIR, COPY requirements, RUN pip install: reused
    assert all(a != b for a, b in zip(after[3:], before[3:], strict=True))


def test_requirements_change_invalidates_the_install(tmp_path: Path) -> None:
    root = context(tmp_path)
    before = keys(root)
    (root / "requirements.txt").write_text("flask==3\n")
    after = keys(root)
    assert after[0] == before[0]
    assert after[1] != before[1]
    assert after[2] != before[2]


def test_run_env_change_invalidates_that_run_not_earlier(tmp_path: Path) -> None:
    root = context(tmp_path)
    before = keys(root)
    after = keys(root, DOCKERFILE.replace("PORT=8080", "PORT=9090"))
    assert after[:4] == before[:4]
    assert after[4] != before[4]


def test_comment_or_line_shift_does_not_invalidate(tmp_path: Path) -> None:
    root = context(tmp_path)
    assert keys(root, "# a comment\n\n" + DOCKERFILE) == keys(root)


def test_egress_flag_is_part_of_run_keys(tmp_path: Path) -> None:
    root = context(tmp_path)
    without, with_egress = keys(root), keys(root, egress=True)
    assert without[:2] == with_egress[:2]
    assert without[2] != with_egress[2]


def test_base_layer_is_the_chain_start() -> None:
    assert base_key("debian12", LayerRef("a")) != base_key("debian12", LayerRef("b"))


async def test_local_layer_cache_round_trip_and_damage_is_a_miss(tmp_path: Path) -> None:
    cache = LocalLayerCache(tmp_path / "cache")
    key = base_key("debian12", LayerRef("x"))
    assert await cache.get(key) is None
    await cache.put(key, LayerRef("layer-7", 1234))
    assert await cache.get(key) == LayerRef("layer-7", 1234)
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    path = tmp_path / "cache" / key[:2] / f"{key}.json"
    path.write_text("{not json")
    assert await cache.get(key) is None
    await cache.forget(key)
    assert not path.exists()


async def test_layers_lists_entries_for_garbage_collection(tmp_path: Path) -> None:
    cache = LocalLayerCache(tmp_path / "cache")
    assert await cache.layers() == {}
    k1, k2 = base_key("debian12", LayerRef("a")), base_key("debian12", LayerRef("b"))
    await cache.put(k1, LayerRef("layer-1", 10))
    await cache.put(k2, LayerRef("layer-2", 20))
    assert await cache.layers() == {k1: LayerRef("layer-1", 10), k2: LayerRef("layer-2", 20)}
