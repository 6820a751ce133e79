"""Opaque, tamper-proof ``nextToken``s.

A token is ``base64url(json{"s": scope, "a": after}) "." base64url(HMAC-SHA256)``: ``after``
is the last sort key the caller saw (keyset pagination: stable under inserts), ``scope`` binds
the token to one listing (operation + account + filters), so a token is refused when it was
changed, forged, or replayed against another listing. The key is 32 random bytes kept in the
data dir (``pagination.key``, mode 0600), created on first use, so tokens survive restarts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from embervm.errors import ValidationError

KEY_FILE = "pagination.key"
KEY_BYTES = 32
DEFAULT_MAX_RESULTS = 50


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_or_create_key(data_dir: Path) -> bytes:
    """The data dir's pagination key (created atomically, 0600, on first use)."""
    path = data_dir / KEY_FILE
    try:
        key = path.read_bytes()
        if len(key) == KEY_BYTES:
            return key
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, secrets.token_bytes(KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # first writer wins; a racing writer reads the winner's key
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_bytes()


class PageTokens:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def encode(self, scope: str, after: int) -> str:
        payload = json.dumps({"s": scope, "a": after}, separators=(",", ":")).encode()
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def decode(self, token: str | None, scope: str) -> int | None:
        """The sort key to continue after, None for the first page; ValidationError if the
        token was not issued by us for this listing."""
        if token is None or token == "":
            return None
        try:
            payload_text, mac_text = token.split(".", 1)
            payload = _unb64(payload_text)
            mac = _unb64(mac_text)
        except (ValueError, binascii.Error) as exc:
            raise ValidationError("The nextToken is not valid") from exc
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise ValidationError("The nextToken is not valid")
        data = json.loads(payload)
        if data.get("s") != scope or not isinstance(data.get("a"), int):
            raise ValidationError("The nextToken does not belong to this request")
        return int(data["a"])


def page_size(max_results: int | None) -> int:
    if max_results is None:
        return DEFAULT_MAX_RESULTS
    if not 1 <= max_results <= DEFAULT_MAX_RESULTS:
        raise ValidationError(f"maxResults must be between 1 and {DEFAULT_MAX_RESULTS}")
    return max_results
