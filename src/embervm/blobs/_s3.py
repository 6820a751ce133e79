"""S3-compatible blob store (boto3), for fleets and for ``s3://`` code artifacts.

boto3 is synchronous: every call runs in a worker thread under an asyncio timeout, and the
client itself has connect/read timeouts and a small retry budget, so a dead endpoint fails in
bounded time instead of hanging a build.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions

from embervm.blobs._keys import check_key
from embervm.blobs._store import CHUNK, stream_to_file
from embervm.errors import NotFoundError, RuntimeFailure

T = TypeVar("T")

_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __repr__(self) -> str:  # never print the secret
        return f"S3Credentials(access_key_id={self.access_key_id!r}, secret_access_key=***)"


@dataclass(frozen=True)
class S3Config:
    """Where ``s3://`` lives: endpoint (None = AWS), credentials (None = boto3's chain), and
    which buckets code artifacts may come from (None: every one)."""

    endpoint_url: str | None = None
    credentials: S3Credentials | None = None
    region: str = "us-east-1"
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    call_timeout: float = 120.0
    ca_file: Path | None = None
    buckets: frozenset[str] | None = None

    def client(self) -> Any:
        """A boto3 S3 client with bounded timeouts and path-style addressing."""
        creds = self.credentials
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=creds.access_key_id if creds else None,
            aws_secret_access_key=creds.secret_access_key if creds else None,
            aws_session_token=creds.session_token if creds else None,
            verify=str(self.ca_file) if self.ca_file else None,
            config=botocore.config.Config(
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                retries={"max_attempts": 2, "mode": "standard"},
                s3={"addressing_style": "path"},
            ),
        )


def is_missing(exc: BaseException) -> bool:
    """True when a botocore error says the bucket or key does not exist."""
    if isinstance(exc, botocore.exceptions.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        return code in _MISSING
    return False


class S3BlobStore:
    """Blobs as objects ``<prefix><key>`` in one bucket of an S3-compatible service."""

    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None,
        credentials: S3Credentials | None,
        *,
        region: str = "us-east-1",
        prefix: str = "",
        config: S3Config | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.config = config or S3Config(endpoint_url, credentials, region)
        self._client = self.config.client()

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    async def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            async with asyncio.timeout(self.config.call_timeout):
                return await asyncio.to_thread(fn)
        except TimeoutError as exc:
            limit = self.config.call_timeout
            raise RuntimeFailure(f"S3 {what} did not finish in {limit} s") from exc
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            if is_missing(exc):
                raise NotFoundError(f"{what}: no such object") from exc
            raise RuntimeFailure(f"S3 {what} failed: {exc}") from exc

    async def put(self, key: str, data: bytes) -> None:
        k = self._key(key)
        await self._call(
            f"put {k}", lambda: self._client.put_object(Bucket=self.bucket, Key=k, Body=data)
        )

    async def put_file(self, key: str, source: Path) -> None:
        k = self._key(key)
        await self._call(f"put {k}", lambda: self._client.upload_file(str(source), self.bucket, k))

    def get_stream(self, key: str, *, chunk_size: int = CHUNK) -> AsyncIterator[bytes]:
        return self.stream_object(self._key(key), chunk_size=chunk_size)

    async def stream_object(self, k: str, *, chunk_size: int = CHUNK) -> AsyncIterator[bytes]:
        """Stream any object of the bucket by its raw S3 key (user URIs are not blob keys)."""
        response: dict[str, Any] = await self._call(
            f"get {k}", lambda: self._client.get_object(Bucket=self.bucket, Key=k)
        )
        body = response["Body"]
        try:
            while True:
                chunk: bytes = await self._call(f"read {k}", lambda: body.read(chunk_size))
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()

    async def get_to_file(self, key: str, dest: Path, *, max_bytes: int) -> int:
        return await stream_to_file(self.get_stream(key), dest, max_bytes=max_bytes, what=key)

    async def exists(self, key: str) -> bool:
        k = self._key(key)
        try:
            await self._call(
                f"head {k}", lambda: self._client.head_object(Bucket=self.bucket, Key=k)
            )
        except NotFoundError:
            return False
        return True

    async def delete(self, key: str) -> None:
        k = self._key(key)
        await self._call(
            f"delete {k}", lambda: self._client.delete_object(Bucket=self.bucket, Key=k)
        )
