"""Who made an API call: the verified access key, its account and the signed region."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    access_key_id: str
    account_id: str
    region: str
