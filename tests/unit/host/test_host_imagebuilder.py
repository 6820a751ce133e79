"""``host/imagebuilder.py``: ``BuildLogFiles`` (whole JSON records, followed to their end) and
``PipelineImageBuilder`` with the pipeline (``ImageBuild``) and the artifact fetch faked: the
version's folder, its work space, the log of a build that asked for none, the result."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from embervm.config import Settings
from embervm.contracts import BuildJob, BuiltImage
from embervm.errors import BuildFailure
from embervm.host import imagebuilder
from embervm.host.imagebuilder import BUILD_LOG, BuildLogFiles, PipelineImageBuilder
from embervm.imagebuild import LocalBuildLog, NullBuildLog

ACCOUNT = "000000000000"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


def _log_path(settings: Settings, name: str = "web", version: str = "1") -> Path:
    path = settings.images_dir / settings.account_id / name / version / BUILD_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


async def _lines(files: BuildLogFiles, *, follow: bool, version: str = "1") -> list[str]:
    return [line async for line in files.lines("web", version, follow=follow)]


# -- BuildLogFiles ---------------------------------------------------------------------------


async def test_a_dump_gives_whole_records_only(settings: Settings) -> None:
    _log_path(settings).write_text('{"message": "a"}\n\n   \n{"message": "b"}\n{"message": "hal')
    assert await _lines(BuildLogFiles(settings), follow=False) == [
        '{"message": "a"}',
        '{"message": "b"}',
    ]


async def test_the_log_of_a_version_without_one_is_empty(settings: Settings) -> None:
    assert await _lines(BuildLogFiles(settings), follow=False, version="9") == []


async def test_a_follower_reads_every_record_up_to_the_end_one(settings: Settings) -> None:
    log = LocalBuildLog(_log_path(settings))
    log.emit("stdout", "step output", step="1/2")
    log.emit("stderr", "a warning")
    log.close("SUCCESSFUL")
    records = [json.loads(x) for x in await _lines(BuildLogFiles(settings), follow=True)]
    assert [(r["stream"], r["step"], r["message"]) for r in records] == [
        ("stdout", "1/2", "step output"),
        ("stderr", None, "a warning"),
        ("end", None, "SUCCESSFUL"),
    ]


# -- PipelineImageBuilder --------------------------------------------------------------------


class FakeImageBuild:
    """What ``ImageBuild`` does with its inputs, as far as the builder can tell: it fetches
    the artifact, logs, closes the log and leaves a snapshot (unless told otherwise)."""

    instances: ClassVar[list[FakeImageBuild]] = []
    fail: Exception | None = None
    snapshot = True

    def __init__(self, spec: Any, *, provider: Any, cache: Any, log: Any) -> None:
        self.spec, self.provider, self.cache, self.log = spec, provider, cache, log
        self.work_existed = False
        FakeImageBuild.instances.append(self)

    async def run(self) -> Any:
        self.work_existed = self.spec.work_dir.is_dir()
        await self.spec.code_artifact(self.spec.work_dir / "code.zip")
        self.log.emit("stdout", "building")
        if FakeImageBuild.fail is not None:
            self.log.close("FAILED")
            raise FakeImageBuild.fail
        if FakeImageBuild.snapshot:
            self.spec.snapshot_dir.mkdir(parents=True)
        self.log.close("SUCCESSFUL")
        return SimpleNamespace(
            snapshot_dir=self.spec.snapshot_dir,
            memory_snapshot_bytes=1,
            disk_snapshot_bytes=2,
            code_install_bytes=3,
        )


@pytest.fixture
def fetched(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    FakeImageBuild.instances = []
    FakeImageBuild.fail = None
    FakeImageBuild.snapshot = True
    monkeypatch.setattr(imagebuilder, "ImageBuild", FakeImageBuild)
    calls: list[dict[str, Any]] = []

    async def fetch(uri: str, dest: Path, **kwargs: Any) -> Path:
        calls.append({"uri": uri, "dest": dest, **kwargs})
        return dest

    monkeypatch.setattr(imagebuilder, "fetch_code_artifact", fetch)
    return calls


def _job(version: str = "1", **request: Any) -> BuildJob:
    body = {
        "baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian12",
        "codeArtifact": {"uri": "file:///data/uploads/x.zip"},
        **request,
    }
    arn = f"arn:aws:lambda:us-east-1:{ACCOUNT}:microvm-image:web"
    return BuildJob(ACCOUNT, "web", arn, version, "b-1", body, 1024)


async def test_a_build_runs_in_the_versions_folder_and_returns_its_snapshot(
    settings: Settings, fetched: list[dict[str, Any]]
) -> None:
    builder = PipelineImageBuilder(settings, machines=object())  # type: ignore[arg-type]
    root = builder.version_dir(ACCOUNT, "web", "1")
    (root / "snapshot").mkdir(parents=True)
    (root / "snapshot" / "stale").write_text("from a deleted image of the same name")
    built = await builder.build(_job(resources=[{"minimumMemoryInMiB": 2048}]))
    assert built == BuiltImage(root / "snapshot", 2048, 1, 2, 3)
    assert not (root / "snapshot" / "stale").exists()
    (run,) = FakeImageBuild.instances
    assert run.work_existed  # made for the build
    assert not (root / "work").exists()  # and removed after it
    assert run.cache is builder.cache
    (fetch,) = fetched
    assert (fetch["uri"], fetch["dest"]) == (
        "file:///data/uploads/x.zip",
        root / "work" / "code.zip",
    )
    assert fetch["file_policy"].roots[0] == settings.uploads_dir
    assert fetch["s3_config"].buckets == frozenset()  # no endpoint, no bucket list: none on AWS
    records = [json.loads(x) for x in (root / BUILD_LOG).read_text().splitlines()]
    assert [r["message"] for r in records] == ["building", "SUCCESSFUL"]


@pytest.mark.parametrize(("fails", "outcome"), [(False, "SUCCESSFUL"), (True, "FAILED")])
async def test_a_build_without_logs_still_leaves_the_end_for_followers(
    settings: Settings, fetched: list[dict[str, Any]], fails: bool, outcome: str
) -> None:
    FakeImageBuild.fail = BuildFailure("step 2 failed") if fails else None
    builder = PipelineImageBuilder(settings, machines=object())  # type: ignore[arg-type]
    job = _job(logging={"disabled": {}})
    if fails:
        with pytest.raises(BuildFailure, match="step 2 failed"):
            await builder.build(job)
    else:
        await builder.build(job)
    assert isinstance(FakeImageBuild.instances[0].log, NullBuildLog)
    root = builder.version_dir(ACCOUNT, "web", "1")
    records = [json.loads(x) for x in (root / BUILD_LOG).read_text().splitlines()]
    assert [(r["stream"], r["message"]) for r in records] == [("end", outcome)]
    assert not (root / "work").exists()


async def test_a_build_that_ends_without_a_snapshot_fails(
    settings: Settings, fetched: list[dict[str, Any]]
) -> None:
    FakeImageBuild.snapshot = False
    builder = PipelineImageBuilder(settings, machines=object())  # type: ignore[arg-type]
    with pytest.raises(BuildFailure, match="without a snapshot"):
        await builder.build(_job())


async def test_discard_removes_one_version_or_the_whole_image(settings: Settings) -> None:
    builder = PipelineImageBuilder(settings, machines=object())  # type: ignore[arg-type]
    for version in ("1", "2"):
        (builder.version_dir(ACCOUNT, "web", version) / "snapshot").mkdir(parents=True)
    (builder.version_dir(ACCOUNT, "api", "1")).mkdir(parents=True)
    await builder.discard("web", "1")
    assert sorted(p.name for p in (settings.images_dir / ACCOUNT / "web").iterdir()) == ["2"]
    await builder.discard("web", None)
    assert sorted(p.name for p in (settings.images_dir / ACCOUNT).iterdir()) == ["api"]
    await builder.discard("gone", None)  # nothing there: no error
