"""The api test harness: the app behind httpx's ASGI transport over a fake core.

Until core lands ``embervm.core.caller`` (another helper's module, the brief's contract:
``Caller(access_key_id, account_id, region)``), a stand-in with exactly that shape is
registered so the API can be tested on its own; once the real module exists it is used.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.awsrequest import AWSRequest
from tests.framework.fake_api import FakeOperations, sign, signed_request

from embervm.api import CredentialStore, create_api_app
from embervm.api.credentials import Credential
from embervm.config import Settings

ENDPOINT = "http://testserver"


class ApiHarness:
    """The app behind httpx's ASGI transport, with its fake core and a valid key pair."""

    def __init__(self, tmp_path: Path, **app_options: Any) -> None:
        self.store = CredentialStore(tmp_path / "credentials")
        self.credential: Credential = self.store.ensure()
        self.operations = FakeOperations()
        self.app = create_api_app(
            self.operations,
            self.store,
            settings=Settings(data_dir=tmp_path, account_id="123456789012"),
            **app_options,
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app, raise_app_exceptions=False),
            base_url=ENDPOINT,
        )

    async def call(self, operation: str, params: dict[str, Any], **sign: Any) -> httpx.Response:
        """``operation`` with ``params`` serialized and signed by botocore, sent as is."""
        request = signed_request(
            operation,
            params,
            access_key_id=sign.pop("access_key_id", self.credential.access_key_id),
            secret_access_key=sign.pop("secret_access_key", self.credential.secret_access_key),
            endpoint=ENDPOINT,
            **sign,
        )
        return await self.send(request.method, request.target, request.headers, request.body)

    async def send(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> httpx.Response:
        return await self.client.request(method, target, headers=headers, content=body)

    async def signed_raw(
        self, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> httpx.Response:
        """Any method/path/body, signed correctly (for garbage the serializer cannot make)."""
        request = AWSRequest(method=method, url=ENDPOINT + target, data=body, headers=headers)
        sign(request, self.credential.access_key_id, self.credential.secret_access_key)
        prepared = request.prepare()
        return await self.send(method, target, dict(prepared.headers.items()), body)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[ApiHarness]:
    harness = ApiHarness(tmp_path)
    async with harness.client:
        yield harness
