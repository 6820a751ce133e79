"""Fixtures of the CLI unit tests: a CLI context on a temp data dir (no EMBERVM_* variable
of the caller's shell leaks in) and a real boto3 client whose calls a botocore ``Stubber``
answers, so every request the CLI makes is checked against the model without a server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber

from embervm.cli import _app
from embervm.cli._context import CliContext

ENV = (
    "EMBERVM_ACCESS_KEY_ID",
    "EMBERVM_SECRET_ACCESS_KEY",
    "EMBERVM_CA_BUNDLE",
    "EMBERVM_DEBUG",
    "EMBERVM_DATA_DIR",
    "EMBERVM_ENDPOINT_URL",
    "EMBERVM_REGION",
    "EMBERVM_ARTIFACT_ROOTS",
)
#: The discard port: nothing answers there (a test that reaches the network fails).
NOWHERE = "http://127.0.0.1:9"


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliContext:
    """The context every command reads through ``_app.current()``."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    context = CliContext(data_dir=tmp_path / "data", endpoint_url=NOWHERE)
    monkeypatch.setitem(_app._state, "ctx", context)
    return context


@pytest.fixture
def stub(ctx: CliContext) -> Iterator[Stubber]:
    """The context's boto3 client, answered by a Stubber; every queued answer must be used."""
    client = boto3.client(
        "lambda-microvms",
        endpoint_url=NOWHERE,
        region_name=ctx.region,
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret",
    )
    ctx._client = client
    with Stubber(client) as stubber:
        yield stubber
        stubber.assert_no_pending_responses()
