"""``UploadArea``: the server's ``uploads/`` folder, where code artifacts sent to it land.

A zip streams into a temporary file while it is hashed, at most ``max_bytes`` and never more
than its declared length; a body whose SHA-256 is not the declared one is discarded. Files are
named by content (``<sha256>.zip``), so the same zip uploaded twice is one file. The artifact
policy lets builds read this folder (``FilePolicy``); ``host.layergc`` prunes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from embervm.blobs._fetch import DEFAULT_MAX_BYTES
from embervm.errors import ValidationError

#: The files of an upload in flight (a crash can leave one; ``host.layergc`` removes them).
TEMP_GLOB = ".upload-*.tmp"
#: The uploads themselves.
ZIP_GLOB = "*.zip"
_WRITE_BATCH = 1 << 20


class UploadArea:
    def __init__(self, root: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = root
        self.max_bytes = max_bytes

    async def receive(
        self, chunks: AsyncIterator[bytes], *, length: int, sha256: str
    ) -> tuple[Path, int]:
        """Store the ``length`` bytes of ``chunks`` as ``<sha256>.zip``; the file and its
        size. ``ValidationError`` when the body is longer or shorter than ``length``, larger
        than ``max_bytes`` or does not hash to ``sha256``; nothing is kept then."""
        if length > self.max_bytes:
            raise ValidationError(f"An upload is at most {self.max_bytes} bytes")
        declared = sha256.lower()
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        temp = self.root / f".upload-{secrets.token_hex(8)}.tmp"
        digest = hashlib.sha256()
        size = 0
        try:
            with await asyncio.to_thread(temp.open, "wb") as out:
                batch: list[bytes] = []
                pending = 0
                async for chunk in chunks:
                    size += len(chunk)
                    if size > length:
                        raise ValidationError("The upload is longer than its Content-Length")
                    digest.update(chunk)
                    batch.append(chunk)
                    pending += len(chunk)
                    if pending >= _WRITE_BATCH:
                        await asyncio.to_thread(out.writelines, batch)
                        batch, pending = [], 0
                await asyncio.to_thread(out.writelines, batch)
                await asyncio.to_thread(os.fsync, out.fileno())
            if size != length:
                raise ValidationError("The upload ended before its Content-Length")
            if digest.hexdigest() != declared:
                raise ValidationError("The upload does not match its x-amz-content-sha256")
            final = self.root / f"{declared}.zip"
            await asyncio.to_thread(os.replace, temp, final)
            return final, size
        finally:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(temp.unlink)
