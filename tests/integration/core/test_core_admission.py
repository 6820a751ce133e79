"""Admission under load, on SQLite and on a real PostgreSQL: 50 concurrent RunMicrovm calls
never overshoot a quota or the host's capacity, never place one VM twice, and place one VM for
one clientToken."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from tests.framework.core_live_server import ACCOUNT, REGION, image, serve

from embervm.core import CoreLimits

CALLS = 50


def _run_all(client: Any, name: str, **params: Any) -> tuple[list[str], list[str]]:
    def one(_: int) -> tuple[str, str]:
        try:
            return "ok", client.run_microvm(imageIdentifier=name, **params)["microvmId"]
        except ClientError as exc:
            return "error", exc.response["Error"]["Code"]

    with ThreadPoolExecutor(CALLS) as pool:
        results = list(pool.map(one, range(CALLS)))
    return ([v for k, v in results if k == "ok"], [v for k, v in results if k == "error"])


def test_quota_holds_under_fifty_concurrent_runs(tmp_path: Path, database_url: str) -> None:
    limits = CoreLimits(rate_limits={}, max_microvms=20)
    with serve(tmp_path / "data", database_url, limits=limits) as server:
        client = server.client()
        image(client, "quota")
        ids, errors = _run_all(client, "quota")
        assert len(ids) == 20
        assert len(set(ids)) == 20
        assert errors == ["ServiceQuotaExceededException"] * 30
        listed = client.list_microvms(maxResults=50)["items"]
        assert {vm["microvmId"] for vm in listed} == set(ids)


def test_fifty_concurrent_runs_with_one_client_token_place_one_vm(
    tmp_path: Path, database_url: str
) -> None:
    with serve(tmp_path / "data", database_url) as server:
        client = server.client()
        image(client, "one-token")
        ids, errors = _run_all(client, "one-token", clientToken="one-token")
        assert errors == []
        assert len(ids) == CALLS
        assert len(set(ids)) == 1
        listed = client.list_microvms(imageIdentifier="one-token", maxResults=50)["items"]
        assert [vm["microvmId"] for vm in listed] == ids[:1]


def test_capacity_refuses_instead_of_overcommitting(tmp_path: Path, database_url: str) -> None:
    limits = CoreLimits(rate_limits={}, host_memory_budget_mib=10 * 1024)  # ten 1 GiB VMs
    with serve(tmp_path / "data", database_url, limits=limits) as server:
        client = server.client()
        image(client, "cap")
        ids, errors = _run_all(client, "cap")
        assert len(ids) == 10
        assert errors == ["InsufficientCapacityException"] * 40


def test_throttling_answers_429_with_retry_after(tmp_path: Path) -> None:
    from embervm.core import RateLimit

    # One token back every 100 s: however slow the machine, the third call finds none.
    limits = CoreLimits(rate_limits={"GetMicrovm": RateLimit(0.01, 2)})
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    with serve(tmp_path / "data", url, limits=limits) as server:
        client = server.client()
        codes = []
        for _ in range(4):
            try:
                client.get_microvm(microvmIdentifier="mvm-00000000000000000000")
            except ClientError as exc:
                headers = exc.response["ResponseMetadata"]["HTTPHeaders"]
                codes.append((exc.response["Error"]["Code"], headers.get("retry-after")))
        assert codes[:2] == [("ResourceNotFoundException", None)] * 2
        assert codes[2][0] == "ThrottlingException"
        assert codes[2][1] is not None
        assert int(codes[2][1]) >= 1


@pytest.mark.parametrize("region", [REGION])
def test_arns_name_the_account(tmp_path: Path, region: str) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    with serve(tmp_path / "data", url) as server:
        created = image(server.client(), "arn")
        assert created["imageArn"] == f"arn:aws:lambda:{region}:{ACCOUNT}:microvm-image:arn"
