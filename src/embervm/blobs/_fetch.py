"""Fetch a build's ``codeArtifact.uri`` into a local file, bounded in size and time.

Every failure becomes ``BuildFailure`` with a reason written for the user who gave the URI:
the build's ``stateReason`` is that sentence. It tells nothing about the host the caller could
not learn otherwise: a local file that is missing, a folder or not a regular file "could not
be fetched" alike, and foreign exception text (botocore's, httpx's) is logged, never shown.
Supported: ``file://`` (a regular file, within what a ``FilePolicy`` allows), ``https://``
(public addresses only, TLS verified: ``_https``), ``s3://bucket/key`` (the configured S3
endpoint, in the buckets its ``S3Config`` allows). Plain ``http://`` is refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from embervm.blobs._https import https_chunks
from embervm.blobs._s3 import S3BlobStore, S3Config
from embervm.blobs._store import CHUNK, stream_to_file
from embervm.errors import BuildFailure, NotFoundError, RuntimeFailure

log = logging.getLogger("embervm.blobs.fetch")

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
DEFAULT_TIMEOUT = 300.0
# Never artifacts: kernel interfaces, and devices (a FIFO or /dev/zero would only hang or fill).
SYSTEM_DENIED = (Path("/proc"), Path("/sys"), Path("/dev"))


@dataclass(frozen=True)
class FilePolicy:
    """Which local files a ``file://`` artifact may name (after links are resolved).

    ``roots``: only inside these folders (``None``: anywhere not denied). ``denied``: never
    inside these folders, except inside one of ``carve_outs`` (the server's data dir is denied
    — it holds keys, credentials and other accounts' images — but its uploads folder is not).
    """

    roots: tuple[Path, ...] | None = None
    denied: tuple[Path, ...] = SYSTEM_DENIED
    carve_outs: tuple[Path, ...] = ()

    def allows(self, real: Path) -> bool:
        """Whether ``real`` (a resolved path) may be read."""
        if self.roots is not None and not _inside_any(real, self.roots):
            return False
        return not _inside_any(real, self.denied) or _inside_any(real, self.carve_outs)


async def fetch_code_artifact(
    uri: str,
    dest: Path,
    *,
    s3_config: S3Config | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109
    ca_file: Path | None = None,
    file_policy: FilePolicy | None = None,
    private_networks: Sequence[str] = (),
) -> Path:
    """Copy the artifact at ``uri`` to ``dest`` (atomically) and return ``dest``.

    ``ca_file`` replaces the system CA bundle for ``https://`` (tests, private CAs);
    ``file_policy`` says which local files ``file://`` may name (default: any regular file
    outside the system's pseudo file systems); ``private_networks`` (CIDRs) are fetched from
    over ``https://`` although they are not public (an on-prem artifact server).
    """
    scheme = urlsplit(uri).scheme.lower()
    try:
        async with asyncio.timeout(timeout):
            if scheme == "file":
                chunks = _file_chunks(uri, file_policy or FilePolicy())
            elif scheme == "https":
                chunks = https_chunks(
                    uri, ca_file=ca_file, max_bytes=max_bytes, private_networks=private_networks
                )
            elif scheme == "s3":
                chunks = _s3_chunks(uri, s3_config or S3Config(), max_bytes=max_bytes)
            elif scheme == "http":
                raise BuildFailure(
                    f"code artifact {uri!r} uses plain http; use https://, s3:// or file://"
                )
            else:
                raise BuildFailure(
                    f"code artifact URI {uri[:200]!r} is not supported: "
                    "use file://, https:// or s3://bucket/key"
                )
            await stream_to_file(chunks, dest, max_bytes=max_bytes, what="code artifact")
    except TimeoutError as exc:
        raise BuildFailure(
            f"downloading the code artifact {uri!r} did not finish within {timeout:.0f} s"
        ) from exc
    except RuntimeFailure as exc:  # stream_to_file's size limit: a sentence about the caller's file
        raise BuildFailure(f"code artifact {uri!r}: {exc}") from exc
    except OSError as exc:
        raise BuildFailure(f"could not store the code artifact: {exc.strerror or exc}") from exc
    return dest


async def _file_chunks(uri: str, policy: FilePolicy) -> AsyncIterator[bytes]:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise BuildFailure(f"code artifact {uri!r}: file:// URIs must name a local path")
    path = Path(unquote(parts.path))
    if not path.is_absolute():
        raise BuildFailure(f"code artifact {uri!r}: file:// URIs need an absolute path")
    refused = BuildFailure(
        f"code artifact {uri!r} is in a folder the server does not read artifacts from "
        "(its uploads, and --artifact-root folders)"
    )
    unreadable = BuildFailure(f"code artifact {uri!r} could not be fetched; give a zip file")
    real = await asyncio.to_thread(path.resolve)
    if not policy.allows(real):
        raise refused
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; regular files ignore it.
        fd = await asyncio.to_thread(os.open, real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:  # missing, unreadable: one answer, whatever the cause
        raise unreadable from exc
    # The path may have been swapped for a link since it was resolved: judge what was opened.
    opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
    if not policy.allows(opened):
        os.close(fd)
        raise refused
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a folder, a device, a FIFO: the same answer
        os.close(fd)
        raise unreadable
    fh = os.fdopen(fd, "rb")
    try:
        while chunk := await asyncio.to_thread(fh.read, CHUNK):
            yield chunk
    finally:
        fh.close()


def _inside_any(real: Path, roots: tuple[Path, ...]) -> bool:
    return any(real.is_relative_to(root.resolve()) for root in roots)


async def _s3_chunks(uri: str, config: S3Config, *, max_bytes: int) -> AsyncIterator[bytes]:
    parts = urlsplit(uri)
    bucket, key = parts.netloc, unquote(parts.path.lstrip("/"))
    if not bucket or not key:
        raise BuildFailure(f"code artifact {uri!r} must look like s3://bucket/key")
    if config.buckets is not None and bucket not in config.buckets:
        raise BuildFailure(
            f"code artifact {uri!r} is in a bucket the server does not read artifacts from "
            "(embervm server --artifact-s3-bucket)"
        )
    store = S3BlobStore(bucket, config.endpoint_url, config.credentials, config=config)
    try:
        async for chunk in store.stream_object(key):
            yield chunk
    except NotFoundError as exc:
        raise BuildFailure(f"code artifact {uri!r} does not exist") from exc
    except RuntimeFailure as exc:  # botocore's words (endpoints, request ids) stay in the log
        log.info("code artifact %s: %s", uri, exc)
        raise BuildFailure(f"code artifact {uri!r} could not be fetched from S3") from exc
