"""The shipped examples are valid build inputs: their Dockerfiles parse against the managed
base image, every COPY finds its files, and an app-only change keeps the dependency layer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from embervm.imagebuild.cache import LayerRef, base_key, describe_step, step_key
from embervm.imagebuild.context import BuildContext, digest_items
from embervm.imagebuild.dockerfile import parse_dockerfile
from embervm.imagebuild.plan import CopyStep, RunStep

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
ARN = "arn:aws:lambda:us-east-1:aws:microvm-image:debian12"


def step_keys(root: Path) -> list[str]:
    ctx = BuildContext(root)
    plan = parse_dockerfile(ctx.read_dockerfile(), base_image_arn=ARN)
    key = base_key(plan.base_image, LayerRef("base"))
    keys = []
    for step in plan.steps:
        digest = digest_items(ctx.select(step)) if isinstance(step, CopyStep) else ""
        key = step_key(key, *describe_step(step, egress=True, copy_digest=digest))
        keys.append(key)
    return keys


@pytest.mark.parametrize("name", ["flask-counter", "grpc-websocket"])
def test_example_plans_and_copies(name: str) -> None:
    ctx = BuildContext(EXAMPLES / name)
    plan = parse_dockerfile(ctx.read_dockerfile(), base_image_arn=ARN)
    assert plan.warnings == ()
    assert plan.config.exposed_ports[0] == 8080
    assert plan.config.app_argv()
    assert dict(plan.config.env)["PATH"].startswith("/app/venv/bin:")
    for step in plan.steps:
        if isinstance(step, CopyStep):
            assert ctx.select(step)
    assert any(isinstance(s, RunStep) and "pip install" in s.argv[-1] for s in plan.steps)
    for source in (EXAMPLES / name).glob("*.py"):
        compile(source.read_text(), str(source), "exec")  # valid Python (deps are in the image)


def test_flask_counter_app_change_reuses_the_dependency_layers(tmp_path: Path) -> None:
    root = tmp_path / "flask-counter"
    shutil.copytree(EXAMPLES / "flask-counter", root)
    before = step_keys(root)
    (root / "app.py").write_text((root / "app.py").read_text() + "\n# changed\n")
    after = step_keys(root)
    plan = parse_dockerfile(BuildContext(root).read_dockerfile(), base_image_arn=ARN)
    copy_app = next(
        i for i, s in enumerate(plan.steps) if isinstance(s, CopyStep) and "app.py" in s.sources
    )
    assert after[:copy_app] == before[:copy_app]
    assert after[copy_app] != before[copy_app]
