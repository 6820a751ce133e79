"""What every service of core shares: settings, store, supervisor, clock, limits, paging."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from embervm.config import Settings
from embervm.core.clock import Clock, to_datetime
from embervm.core.limits import CoreLimits
from embervm.core.paging import PageTokens
from embervm.core.seams import AppLogSource, BuildLogSource, TokenIssuer
from embervm.core.supervisor import Supervisor
from embervm.store import IdempotencyClaim, Repository


@dataclass
class CoreContext:
    settings: Settings
    repo: Repository
    supervisor: Supervisor
    clock: Clock
    limits: CoreLimits
    pages: PageTokens
    tokens: TokenIssuer | None = None
    build_logs: BuildLogSource | None = None
    app_logs: AppLogSource | None = None
    chipset_generation: str = "x86-64-v2"

    def now(self) -> datetime:
        return to_datetime(self.clock.now())


def request_hash(params: Mapping[str, Any]) -> str:
    """The body an idempotency token is bound to: every member but ``clientToken``."""
    body = {k: v for k, v in params.items() if k != "clientToken"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def claim_for(
    params: Mapping[str, Any], *, account_id: str, scope: str, resource_id: str
) -> IdempotencyClaim | None:
    token = params.get("clientToken")
    if not token:
        return None
    return IdempotencyClaim(
        account_id=account_id,
        scope=scope,
        client_token=str(token),
        request_hash=request_hash(params),
        resource_id=resource_id,
    )
