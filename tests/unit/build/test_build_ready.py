"""Hook settings from the model and the hook retry rules (over httpx.MockTransport)."""

from __future__ import annotations

import httpx
import pytest

from embervm.build.ready import HOOK_PATH, HookSettings, wait_for_hook
from embervm.errors import BuildFailure


def test_hook_settings_from_model() -> None:
    assert HookSettings.from_model(None) == HookSettings()
    s = HookSettings.from_model(
        {
            "port": 9000,
            "microvmImageHooks": {
                "ready": "ENABLED",
                "readyTimeoutInSeconds": 12,
                "validate": "DISABLED",
            },
        }
    )
    assert (s.port, s.ready, s.ready_timeout, s.validate, s.validate_timeout) == (
        9000,
        True,
        12.0,
        False,
        30.0,
    )


def scripted(statuses: list[int]) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(statuses[min(len(seen), len(statuses)) - 1])

    return httpx.MockTransport(handler), seen


async def test_503_is_retried_until_200() -> None:
    transport, seen = scripted([503, 503, 200])
    await wait_for_hook("ready", ("10.0.0.1", 8080), timeout=5, interval=0, transport=transport)
    assert len(seen) == 3
    assert all(r.method == "POST" for r in seen)
    assert seen[0].url.path == HOOK_PATH + "ready"


async def test_other_status_fails_at_once() -> None:
    transport, seen = scripted([404])
    with pytest.raises(BuildFailure, match="answered HTTP 404"):
        await wait_for_hook("validate", ("h", 1), timeout=5, interval=0, transport=transport)
    assert len(seen) == 1


async def test_never_ready_fails_at_timeout_naming_the_last_answer() -> None:
    transport, _ = scripted([503])
    with pytest.raises(BuildFailure, match=r"did not answer 200 within 0.2 s \(last: HTTP 503\)"):
        await wait_for_hook("ready", ("h", 1), timeout=0.2, interval=0.01, transport=transport)


async def test_app_exit_stops_the_wait() -> None:
    transport, _ = scripted([503])

    async def exited() -> int | None:
        return 2

    with pytest.raises(BuildFailure, match="exited with code 2"):
        await wait_for_hook("ready", ("h", 1), timeout=5, transport=transport, app_exit_code=exited)
