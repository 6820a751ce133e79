"""Hook settings from the model and the hook retry rules (over httpx.MockTransport)."""

from __future__ import annotations

import httpx
import pytest

from embervm.errors import BuildFailure
from embervm.imagebuild.ready import (
    HOOK_PATH,
    HookSettings,
    http_hook,
    wait_for_hook,
    wait_for_port,
)


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


def scripted(statuses: list[int | None]):  # type: ignore[no-untyped-def]
    """A HookCall answering the scripted statuses in turn (the last repeats)."""
    seen: list[tuple[str, float]] = []

    async def call(hook: str, attempt: float) -> int | None:
        seen.append((hook, attempt))
        return statuses[min(len(seen), len(statuses)) - 1]

    return call, seen


async def test_503_and_no_answer_are_retried_until_200() -> None:
    call, seen = scripted([None, 503, 503, 200])
    await wait_for_hook("ready", call, timeout=5, interval=0)
    assert [hook for hook, _ in seen] == ["ready"] * 4


async def test_http_hook_posts_to_the_hook_path() -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(503)

    transport = httpx.MockTransport(handler)
    assert await http_hook(("10.0.0.1", 9000), "ready", 1, transport=transport) == 503
    (request,) = requests
    assert request.method == "POST"
    assert str(request.url) == f"http://10.0.0.1:9000{HOOK_PATH}ready"


async def test_other_status_fails_at_once() -> None:
    call, seen = scripted([404])
    with pytest.raises(BuildFailure, match="answered HTTP 404"):
        await wait_for_hook("validate", call, timeout=5, interval=0)
    assert len(seen) == 1


async def test_never_ready_fails_at_timeout_naming_the_last_answer() -> None:
    call, _ = scripted([503])
    with pytest.raises(BuildFailure, match=r"did not answer 200 within 0.2 s \(last: HTTP 503\)"):
        await wait_for_hook("ready", call, timeout=0.2, interval=0.01)


async def test_app_exit_stops_the_wait() -> None:
    call, _ = scripted([503])

    async def exited() -> int | None:
        return 2

    with pytest.raises(BuildFailure, match="exited with code 2"):
        await wait_for_hook("ready", call, timeout=5, app_exit_code=exited)


async def test_port_wait_retries_until_open_and_fails_at_timeout() -> None:
    answers = [False, False, True]

    async def probe(attempt: float) -> bool:
        return answers.pop(0)

    await wait_for_port(probe, port=8080, timeout=5, interval=0)
    assert answers == []

    async def never(attempt: float) -> bool:
        return False

    with pytest.raises(BuildFailure, match=r"port 8081 within 0.1 s"):
        await wait_for_port(never, port=8081, timeout=0.1, interval=0.01)
