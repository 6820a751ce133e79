"""Runtime lifecycle hooks: POST ``/aws/lambda-microvms/runtime/v1/<hook>`` in the guest.

Hooks go through the guest agent's in-guest HTTP relay (``AgentClient.http_request`` to
``127.0.0.1:<hooks port>`` inside the VM), not over the VM network: they work whatever the
VM's ingress connectors are, and no network rule has to let the host in.

``run`` and ``resume`` get one attempt within their timeout (the app answered when the
snapshot was taken, so it answers at once after a restore); ``suspend`` and ``terminate`` are
retried until they answer 200 or their timeout ends (AWS may retry them too: docs/HOOKS.md).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embervm.errors import GuestError
from embervm.fileio import atomic_write
from embervm.guest import GuestAgent
from embervm.wire import APP_PORT

HOOK_PATH = "/aws/lambda-microvms/runtime/v1/"
DEFAULT_PORT = APP_PORT
DEFAULT_TIMEOUT = 1.0
MAX_TIMEOUT = 60.0  # the model's range for every runtime hook: 1-60 s
RUNTIME_HOOKS = ("run", "resume", "suspend", "terminate")
RETRIED = frozenset({"suspend", "terminate"})
RETRY_PAUSE = 0.1


@dataclass(frozen=True)
class RuntimeHooks:
    """The run-time half of the model's ``Hooks`` (``microvmHooks``) of one image version."""

    port: int = DEFAULT_PORT
    enabled: frozenset[str] = frozenset()
    timeouts: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_model(cls, hooks: Mapping[str, Any] | None) -> RuntimeHooks:
        """From the model's ``Hooks``; values out of the model's ranges (a record written by
        another version, a hand-edited store) fall back to the defaults."""
        if not hooks:
            return cls()
        runtime = hooks.get("microvmHooks") or {}
        return cls(
            port=int(_bounded(hooks.get("port"), 1, 65535, DEFAULT_PORT)),
            enabled=frozenset(h for h in RUNTIME_HOOKS if runtime.get(h) == "ENABLED"),
            timeouts={
                h: _bounded(runtime.get(f"{h}TimeoutInSeconds"), 1, MAX_TIMEOUT, DEFAULT_TIMEOUT)
                for h in RUNTIME_HOOKS
            },
        )

    def timeout(self, hook: str) -> float:
        return self.timeouts.get(hook, DEFAULT_TIMEOUT)

    def save(self, path: Path) -> None:
        """Durably (A22): after a crash the VM's hooks are the old ones or the new ones."""
        body = {"port": self.port, "enabled": sorted(self.enabled), "timeouts": self.timeouts}
        atomic_write(path, json.dumps(body), mode=0o600)

    @classmethod
    def load(cls, path: Path) -> RuntimeHooks:
        """Hooks saved at launch (they outlive a server restart); none if missing or bad."""
        try:
            body = json.loads(path.read_text())
            return cls.from_model(
                {
                    "port": body["port"],
                    "microvmHooks": {
                        **{h: "ENABLED" for h in body["enabled"] if h in RUNTIME_HOOKS},
                        **{f"{h}TimeoutInSeconds": body["timeouts"][h] for h in RUNTIME_HOOKS},
                    },
                }
            )
        except (OSError, ValueError, KeyError, TypeError):
            return cls()


def _bounded(value: object, lo: float, hi: float, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return float(value) if lo <= value <= hi else default


async def call_hook(agent: GuestAgent, hooks: RuntimeHooks, hook: str, body: bytes = b"") -> None:
    """Call ``hook`` if the image enabled it; raise GuestError unless it answers 200 in time."""
    if hook not in hooks.enabled:
        return
    limit = hooks.timeout(hook)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    last = "no answer"
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            response = await agent.http_request(
                hooks.port, HOOK_PATH + hook, body=body, timeout=remaining
            )
        except GuestError as exc:
            last = str(exc)
        else:
            if response.status == 200:
                return
            last = f"HTTP {response.status}"
        if hook not in RETRIED:
            break
        await asyncio.sleep(min(RETRY_PAUSE, max(0.0, deadline - loop.time())))
    raise GuestError(f"the /{hook} hook did not answer 200 within {limit:g} s ({last})")
