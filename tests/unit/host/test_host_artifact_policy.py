"""Which file:// code artifacts the server's builds may read (settings → FilePolicy)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from embervm.blobs import S3Config, fetch_code_artifact
from embervm.cli.server import artifact_roots
from embervm.config import Settings
from embervm.errors import BuildFailure
from embervm.host.imagebuilder import artifact_file_policy, artifact_s3_config


def settings(tmp_path: Path, roots: tuple[Path, ...] | None = None) -> Settings:
    data = tmp_path / "data"
    for sub in ("keys", "uploads", "images/111122223333/app/1"):
        (data / sub).mkdir(parents=True)
    (data / "keys" / "tokens.json").write_text("{}")
    (data / "credentials").write_text("[default]")
    (data / "images/111122223333/app/1/code.zip").write_bytes(b"other account")
    (data / "uploads" / "mine.zip").write_bytes(b"mine")
    return Settings(data_dir=data, artifact_roots=roots)


@pytest.mark.parametrize(
    "secret", ["keys/tokens.json", "credentials", "images/111122223333/app/1/code.zip"]
)
async def test_the_data_dir_is_never_an_artifact_source(tmp_path: Path, secret: str) -> None:
    config = settings(tmp_path)
    with pytest.raises(BuildFailure, match="does not read artifacts from"):
        await fetch_code_artifact(
            (config.data_dir / secret).as_uri(),
            tmp_path / "out.zip",
            file_policy=artifact_file_policy(config),
        )


async def test_by_default_only_uploads_are_read(tmp_path: Path) -> None:
    config = settings(tmp_path)
    elsewhere = tmp_path / "project.zip"
    elsewhere.write_bytes(b"project")
    policy = artifact_file_policy(config)
    out = await fetch_code_artifact(
        (config.uploads_dir / "mine.zip").as_uri(), tmp_path / "out.zip", file_policy=policy
    )
    assert out.read_bytes() == b"mine"
    for refused in (elsewhere, Path("/etc/ssh/sshd_config"), Path("/etc/nope")):
        with pytest.raises(BuildFailure, match="does not read artifacts from"):
            await fetch_code_artifact(refused.as_uri(), tmp_path / "x.zip", file_policy=policy)


async def test_artifact_roots_add_folders_but_never_the_data_dir(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "ok.zip").write_bytes(b"ok")
    config = settings(tmp_path, roots=(allowed, tmp_path))  # tmp_path holds the data dir
    policy = artifact_file_policy(config)
    for source, body in ((allowed / "ok.zip", b"ok"), (config.uploads_dir / "mine.zip", b"mine")):
        out = await fetch_code_artifact(source.as_uri(), tmp_path / "out.zip", file_policy=policy)
        assert out.read_bytes() == body
    with pytest.raises(BuildFailure, match="does not read artifacts from"):
        await fetch_code_artifact(
            (config.data_dir / "credentials").as_uri(), tmp_path / "x.zip", file_policy=policy
        )


def test_artifact_roots_from_flags_then_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EMBERVM_ARTIFACT_ROOTS", raising=False)
    assert artifact_roots(None) is None
    monkeypatch.setenv("EMBERVM_ARTIFACT_ROOTS", f"{tmp_path}/a::{tmp_path}/b")
    assert artifact_roots(None) == (tmp_path / "a", tmp_path / "b")
    assert artifact_roots([tmp_path / "c"]) == (tmp_path / "c",)


def test_s3_artifacts_use_the_configured_endpoint_and_region(tmp_path: Path) -> None:
    config = Settings(
        data_dir=tmp_path, region="eu-west-1", s3_endpoint_url="http://127.0.0.1:9000"
    )
    s3 = artifact_s3_config(config)
    assert (s3.endpoint_url, s3.region, s3.credentials) == (
        "http://127.0.0.1:9000",
        "eu-west-1",
        None,  # boto3's own chain
    )


def test_s3_buckets_every_one_of_an_endpoint_none_on_aws_unless_listed(tmp_path: Path) -> None:
    endpoint = Settings(data_dir=tmp_path, s3_endpoint_url="http://127.0.0.1:9000")
    assert artifact_s3_config(endpoint).buckets is None
    assert artifact_s3_config(Settings(data_dir=tmp_path)).buckets == frozenset()
    listed = Settings(data_dir=tmp_path, artifact_s3_buckets=("apps", "builds"))
    assert artifact_s3_config(listed).buckets == frozenset({"apps", "builds"})


@pytest.mark.parametrize("buckets", [frozenset(), frozenset({"apps"})])
async def test_a_bucket_outside_the_list_is_refused_before_s3_is_asked(
    tmp_path: Path, buckets: frozenset[str]
) -> None:
    config = S3Config(endpoint_url="http://127.0.0.1:9", buckets=buckets, call_timeout=1)
    with pytest.raises(BuildFailure, match="in a bucket the server does not read artifacts from"):
        await fetch_code_artifact("s3://other/app.zip", tmp_path / "a.zip", s3_config=config)


def test_server_refuses_an_s3_endpoint_that_is_not_a_url(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "embervm.cli", "--data-dir", str(tmp_path), "server",
            "--s3-endpoint-url", "minio:9000"]  # fmt: skip
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 2, done
    assert "'minio:9000' is not an http(s) URL" in done.stderr
    assert not (tmp_path / "embervm.db").exists()  # refused before anything started


def test_server_refuses_a_private_network_that_is_not_a_cidr(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "embervm.cli", "--data-dir", str(tmp_path), "server",
            "--artifact-private-network", "intranet"]  # fmt: skip
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 2, done
    assert "'intranet' is not a network" in done.stderr
    assert not (tmp_path / "embervm.db").exists()
