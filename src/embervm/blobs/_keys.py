"""Blob keys: relative, slash-separated names that can never address anything outside a store."""

from __future__ import annotations

from embervm.errors import ValidationError

MAX_KEY_LENGTH = 1024


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe blob key, else raise ValidationError.

    Keys are used as file paths by LocalBlobStore, so the rules are the path rules: no absolute
    keys, no empty, ``.`` or ``..`` segments, no backslashes or NUL bytes.
    """
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ValidationError(f"blob key must be 1-{MAX_KEY_LENGTH} characters")
    if key.startswith("/") or "\\" in key or "\0" in key:
        raise ValidationError(f"blob key {key[:80]!r} must be relative and slash-separated")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValidationError(f"blob key {key[:80]!r} has an empty, '.' or '..' segment")
    return key
