"""Request members → BuildSpec (egress default, memory, hooks, environment)."""

from __future__ import annotations

from pathlib import Path

from embervm.imagebuild.request import build_egress, spec_from_request

CONNECTOR = "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:"


async def fetch(dest: Path) -> Path:
    return dest


def test_egress_defaults_on_and_follows_connectors() -> None:
    assert build_egress(None) is True
    assert build_egress([CONNECTOR + "INTERNET_EGRESS"]) is True
    assert build_egress([]) is False
    assert build_egress(["arn:aws:lambda:us-east-1:123456789012:network-connector:vpc-1"]) is False


def test_spec_from_request_maps_members(tmp_path: Path) -> None:
    spec = spec_from_request(
        {
            "baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian12",
            "codeArtifact": {"uri": "s3://b/k.zip"},
            "environmentVariables": {"A": "1"},
            "resources": [{"minimumMemoryInMiB": 2048}],
            "hooks": {"port": 9000, "microvmImageHooks": {"ready": "ENABLED"}},
            "egressNetworkConnectors": [],
        },
        fetch=fetch,
        snapshot_dir=tmp_path / "s",
        work_dir=tmp_path / "w",
        step_timeout=60.0,
    )
    assert spec.app_memory_mib == 2048
    assert spec.environment == {"A": "1"}
    assert spec.hooks.ready
    assert spec.hooks.port == 9000
    assert spec.egress is False
    assert spec.step_timeout == 60.0
    assert spec.code_artifact is fetch
