"""``host/hooks.py``: the model's ``Hooks`` read with out-of-range values falling back, and
``call_hook`` against a fake agent: one attempt for run and resume, retries until 200 or
the timeout for suspend and terminate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from embervm.errors import GuestError
from embervm.guest.client import HttpResponse
from embervm.host import hooks as hooks_module
from embervm.host.hooks import DEFAULT_PORT, HOOK_PATH, RuntimeHooks, call_hook


class FakeAgent:
    """``http_request`` answers with the statuses (or raises the errors) of ``answers`` in
    turn, the last one for ever."""

    def __init__(self, *answers: int | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[dict[str, Any]] = []

    async def http_request(
        self,
        port: int,
        path: str,
        *,
        body: bytes = b"",
        timeout: float = 30.0,  # noqa: ASYNC109
    ) -> HttpResponse:
        self.calls.append({"port": port, "path": path, "body": body, "timeout": timeout})
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return HttpResponse(status=answer, headers=[], body=b"", truncated=False)


def _hooks(*enabled: str, timeout: float = 1.0, port: int = 9000) -> RuntimeHooks:
    return RuntimeHooks(
        port=port,
        enabled=frozenset(enabled),
        timeouts=dict.fromkeys(("run", "resume", "suspend", "terminate"), timeout),
    )


# -- reading the model -----------------------------------------------------------------------


def test_no_hooks_is_the_defaults() -> None:
    assert RuntimeHooks.from_model(None) == RuntimeHooks()
    assert RuntimeHooks.from_model({}) == RuntimeHooks()
    assert RuntimeHooks().port == DEFAULT_PORT == 8080
    assert RuntimeHooks().timeout("run") == 1.0


def test_only_enabled_runtime_hooks_count() -> None:
    hooks = RuntimeHooks.from_model(
        {
            "port": 9000,
            "microvmHooks": {
                "run": "ENABLED",
                "resume": "DISABLED",
                "suspend": "ENABLED",
                "validate": "ENABLED",  # a build hook, not a runtime one
                "terminate": "enabled",
            },
        }
    )
    assert hooks.enabled == {"run", "suspend"}
    assert hooks.port == 9000


@pytest.mark.parametrize(
    ("value", "timeout"),
    [(1, 1.0), (60, 60.0), (12.5, 12.5), (0.5, 1.0), (61, 1.0), (True, 1.0), ("5", 1.0)],
)
def test_timeouts_outside_one_to_sixty_seconds_fall_back(value: object, timeout: float) -> None:
    hooks = RuntimeHooks.from_model({"microvmHooks": {"suspendTimeoutInSeconds": value}})
    assert hooks.timeout("suspend") == timeout
    assert hooks.timeout("run") == 1.0


@pytest.mark.parametrize(("port", "expected"), [(1, 1), (65535, 65535), (0, 8080), (70000, 8080)])
def test_a_port_outside_the_range_falls_back(port: int, expected: int) -> None:
    assert RuntimeHooks.from_model({"port": port}).port == expected


def test_saved_hooks_round_trip_and_bad_files_are_no_hooks(tmp_path: Path) -> None:
    hooks = RuntimeHooks.from_model(
        {"port": 7000, "microvmHooks": {"run": "ENABLED", "terminateTimeoutInSeconds": 30}}
    )
    hooks.save(tmp_path / "h.json")
    loaded = RuntimeHooks.load(tmp_path / "h.json")
    assert (loaded.port, loaded.enabled, loaded.timeout("terminate")) == (7000, {"run"}, 30.0)
    assert RuntimeHooks.load(tmp_path / "absent.json") == RuntimeHooks()
    for bad in ("not json", "[]", '{"port": 1}', '{"port": 1, "enabled": 5, "timeouts": {}}'):
        (tmp_path / "bad.json").write_text(bad)
        assert RuntimeHooks.load(tmp_path / "bad.json") == RuntimeHooks()


def test_a_saved_file_naming_an_unknown_hook_loads_without_it(tmp_path: Path) -> None:
    timeouts = dict.fromkeys(("run", "resume", "suspend", "terminate"), 2)
    body = '{"port": 8080, "enabled": ["run", "explode"], "timeouts": %s}'
    (tmp_path / "h.json").write_text(body % str(timeouts).replace("'", '"'))
    assert RuntimeHooks.load(tmp_path / "h.json").enabled == {"run"}


# -- calling ---------------------------------------------------------------------------------


async def test_a_hook_the_image_did_not_enable_is_not_called() -> None:
    agent = FakeAgent(200)
    await call_hook(agent, _hooks("suspend"), "run")
    assert agent.calls == []


async def test_a_hook_is_a_post_to_its_path_on_the_hooks_port_with_the_body() -> None:
    agent = FakeAgent(200)
    await call_hook(agent, _hooks("run", timeout=5), "run", b'{"user": 7}')
    (call,) = agent.calls
    assert (call["port"], call["path"], call["body"]) == (9000, HOOK_PATH + "run", b'{"user": 7}')
    assert 0 < call["timeout"] <= 5


@pytest.mark.parametrize("hook", ["run", "resume"])
@pytest.mark.parametrize(
    ("answer", "said"),
    [(500, "HTTP 500"), (GuestError("connection refused"), "connection refused")],
)
async def test_run_and_resume_get_one_attempt(
    hook: str, answer: int | Exception, said: str
) -> None:
    agent = FakeAgent(answer, 200)
    with pytest.raises(GuestError) as raised:
        await call_hook(agent, _hooks(hook, timeout=5), hook)
    assert len(agent.calls) == 1
    assert str(raised.value) == f"the /{hook} hook did not answer 200 within 5 s ({said})"


@pytest.mark.parametrize("hook", ["suspend", "terminate"])
async def test_suspend_and_terminate_are_retried_until_200(
    hook: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hooks_module, "RETRY_PAUSE", 0.0)
    agent = FakeAgent(503, GuestError("app not listening"), 404, 200, 500)
    await call_hook(agent, _hooks(hook, timeout=30), hook)
    assert len(agent.calls) == 4


async def test_retries_stop_at_the_timeout_with_the_last_answer() -> None:
    agent = FakeAgent(GuestError("refused"), 500)
    with pytest.raises(GuestError, match=r"within 0.3 s \(HTTP 500\)"):
        await call_hook(agent, _hooks("terminate", timeout=0.3), "terminate")
    timeouts = [call["timeout"] for call in agent.calls]
    assert len(timeouts) >= 2  # retried, with what was left of the time each attempt
    assert timeouts == sorted(timeouts, reverse=True)
    assert all(0 < t <= 0.3 for t in timeouts)
