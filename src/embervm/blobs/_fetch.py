"""Fetch a build's ``codeArtifact.uri`` into a local file, bounded in size and time.

Every failure becomes ``BuildFailure`` with a reason written for the user who gave the URI:
the build's ``stateReason`` is that sentence. Supported: ``file://`` (a regular file, within
what a ``FilePolicy`` allows), ``https://`` (TLS verified against the system CA bundle, or a
given CA file), ``s3://bucket/key`` (the configured S3 endpoint). Plain ``http://`` is refused.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from embervm.blobs._s3 import S3BlobStore, S3Config
from embervm.blobs._store import CHUNK, stream_to_file
from embervm.errors import BuildFailure, NotFoundError, RuntimeFailure

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
DEFAULT_TIMEOUT = 300.0
MAX_REDIRECTS = 5
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

    def refusal(self, real: Path) -> str | None:
        """Why ``real`` (a resolved path) may not be read, or ``None``."""
        if self.roots is not None and not _inside_any(real, self.roots):
            allowed = ", ".join(str(r) for r in self.roots)
            return f"is outside the allowed folders ({allowed})"
        if _inside_any(real, self.denied) and not _inside_any(real, self.carve_outs):
            return "is in a folder the server does not read artifacts from"
        return None


async def fetch_code_artifact(
    uri: str,
    dest: Path,
    *,
    s3_config: S3Config | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109
    ca_file: Path | None = None,
    file_policy: FilePolicy | None = None,
) -> Path:
    """Copy the artifact at ``uri`` to ``dest`` (atomically) and return ``dest``.

    ``ca_file`` replaces the system CA bundle for ``https://`` (tests, private CAs);
    ``file_policy`` says which local files ``file://`` may name (default: any regular file
    outside the system's pseudo file systems).
    """
    scheme = urlsplit(uri).scheme.lower()
    try:
        async with asyncio.timeout(timeout):
            if scheme == "file":
                chunks = _file_chunks(uri, file_policy or FilePolicy())
            elif scheme == "https":
                chunks = _https_chunks(uri, ca_file=ca_file, max_bytes=max_bytes)
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
    except RuntimeFailure as exc:
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
    real = await asyncio.to_thread(path.resolve)
    refusal = policy.refusal(real)
    if refusal is not None:
        raise BuildFailure(f"code artifact {uri!r} {refusal}")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; regular files ignore it.
        fd = await asyncio.to_thread(os.open, real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise BuildFailure(f"code artifact {uri!r} does not exist") from exc
    except OSError as exc:
        raise BuildFailure(f"code artifact {uri!r} cannot be read: {exc.strerror}") from exc
    # The path may have been swapped for a link since it was resolved: judge what was opened.
    opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
    refusal = policy.refusal(opened)
    if refusal is not None:
        os.close(fd)
        raise BuildFailure(f"code artifact {uri!r} {refusal}")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise BuildFailure(f"code artifact {uri!r} is {kind}; give a zip file")
    fh = os.fdopen(fd, "rb")
    try:
        while chunk := await asyncio.to_thread(fh.read, CHUNK):
            yield chunk
    finally:
        fh.close()


def _inside_any(real: Path, roots: tuple[Path, ...]) -> bool:
    return any(real.is_relative_to(root.resolve()) for root in roots)


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """The system trust store (``/etc/ssl/certs``) unless a CA file is given."""
    if ca_file is not None:
        return ssl.create_default_context(cafile=str(ca_file))
    return ssl.create_default_context()


async def _https_chunks(uri: str, *, ca_file: Path | None, max_bytes: int) -> AsyncIterator[bytes]:
    timeouts = httpx.Timeout(30.0, connect=10.0)

    async def https_only(request: httpx.Request) -> None:
        """Checked before every request, so a redirect to http:// is never followed."""
        if request.url.scheme != "https":
            raise BuildFailure(f"code artifact {uri!r} redirected to a non-https URL")

    async with httpx.AsyncClient(
        event_hooks={"request": [https_only]},
        verify=_tls_context(ca_file),
        timeout=timeouts,
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        trust_env=True,
    ) as client:
        try:
            async with client.stream("GET", uri) as response:
                if response.status_code != 200:
                    raise BuildFailure(
                        f"downloading the code artifact {uri!r} returned HTTP "
                        f"{response.status_code}"
                    )
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                    raise BuildFailure(
                        f"code artifact {uri!r} is {declared} bytes; the limit is {max_bytes}"
                    )
                async for chunk in response.aiter_bytes(CHUNK):
                    yield chunk
        except httpx.TooManyRedirects as exc:
            raise BuildFailure(f"code artifact {uri!r}: too many redirects") from exc
        except httpx.ConnectError as exc:
            cause = "TLS certificate not trusted" if _is_tls(exc) else "could not connect"
            raise BuildFailure(f"code artifact {uri!r}: {cause} ({exc})") from exc
        except httpx.TimeoutException as exc:
            raise BuildFailure(f"code artifact {uri!r}: the server stopped answering") from exc
        except httpx.HTTPError as exc:
            raise BuildFailure(f"code artifact {uri!r}: download failed ({exc})") from exc


def _is_tls(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


async def _s3_chunks(uri: str, config: S3Config, *, max_bytes: int) -> AsyncIterator[bytes]:
    parts = urlsplit(uri)
    bucket, key = parts.netloc, unquote(parts.path.lstrip("/"))
    if not bucket or not key:
        raise BuildFailure(f"code artifact {uri!r} must look like s3://bucket/key")
    store = S3BlobStore(bucket, config.endpoint_url, config.credentials, config=config)
    try:
        async for chunk in store.stream_object(key):
            yield chunk
    except NotFoundError as exc:
        raise BuildFailure(f"code artifact {uri!r} does not exist") from exc
