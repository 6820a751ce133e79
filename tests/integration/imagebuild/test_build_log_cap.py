"""A RUN step that prints without end, in a real microVM (TCG): the build log stops at its cap
with one "log truncated" record and the end record (A10)."""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.framework.build_qemu_helpers import QEMU, QemuTestProvider

from embervm.errors import BuildFailure
from embervm.guest.artifacts import GuestArtifacts
from embervm.imagebuild import BuildSpec, ImageBuild, LocalBuildLog, LocalLayerCache

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ARN = "arn:aws:lambda:us-east-1:aws:microvm-image:debian12"
CAP = 512 * 1024


@pytest.fixture
async def provider(
    guest_artifacts: GuestArtifacts, tmp_path: Path
) -> AsyncIterator[QemuTestProvider]:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not installed")
    p = QemuTestProvider(guest_artifacts, tmp_path / "vms")
    yield p
    for vm in p.vms:
        await vm.shutdown()


async def test_a_step_printing_without_end_leaves_a_log_no_larger_than_its_cap(
    provider: QemuTestProvider, tmp_path: Path
) -> None:
    archive = tmp_path / "yes.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("Dockerfile", 'FROM embervm/debian12\nRUN timeout 20 yes\nCMD ["true"]\n')
    path = tmp_path / "build.log"
    log = LocalBuildLog(path, max_bytes=CAP)
    spec = BuildSpec(
        base_image_arn=ARN,
        code_artifact=archive,
        snapshot_dir=tmp_path / "snapshot",
        work_dir=tmp_path / "work",
        step_timeout=120,
    )
    with pytest.raises(BuildFailure, match="exit code 124"):
        await ImageBuild(
            spec, provider=provider, cache=LocalLayerCache(tmp_path / "cache"), log=log
        ).run()
    assert path.stat().st_size <= CAP
    records = [json.loads(line) for line in path.read_text().splitlines()]
    truncated = [r for r in records if r["message"].startswith("log truncated")]
    assert len(truncated) == 1
    assert records.index(truncated[0]) > 1000  # `yes` filled the log first
    assert (records[-1]["stream"], records[-1]["message"]) == ("end", "FAILED")
    assert provider.running() == []
