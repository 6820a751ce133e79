"""Runtime hook calls (``embervm.host.hooks``) through the real guest agent's HTTP relay
(``tests.framework.local_guest_agent.local_agent``: the agent the guest runs, as a local
process) to a real HTTP server on 127.0.0.1 playing the app: retries, single attempts,
timeouts, settings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests.framework.local_guest_agent import local_agent

from embervm.errors import GuestError
from embervm.guest.client import AgentClient
from embervm.host.hooks import HOOK_PATH, RuntimeHooks, call_hook

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@dataclass
class App:
    """Answers each POST to a hook with the next scripted status (the last one repeats);
    a status of 0 means: never answer."""

    script: dict[str, list[int]]
    seen: list[tuple[str, bytes]] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = head.split(b" ", 2)[1].decode()
            length = next(
                (int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                 if line.startswith(b"content-length:")),
                0,
            )  # fmt: skip
            body = await reader.readexactly(length)
            hook = path.removeprefix(HOOK_PATH)
            self.seen.append((hook, body))
            statuses = self.script.get(hook, [404])
            status = statuses[min(sum(h == hook for h, _ in self.seen), len(statuses)) - 1]
            if status == 0:
                await asyncio.sleep(30)
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
        finally:
            writer.close()

    def hooks(self, *enabled: str, timeout: int = 2) -> RuntimeHooks:
        return RuntimeHooks.from_model(
            {
                "port": self.port,
                "microvmHooks": {
                    **{h: "ENABLED" for h in enabled},
                    **{f"{h}TimeoutInSeconds": timeout for h in enabled},
                },
            }
        )


@pytest.fixture
async def agent() -> AsyncIterator[AgentClient]:
    async with local_agent() as client:
        yield client


async def serve(app: App) -> asyncio.Server:
    server = await asyncio.start_server(app.handle, "127.0.0.1", 0)
    app.port = server.sockets[0].getsockname()[1]
    return server


async def test_suspend_is_retried_until_it_answers_200(agent: AgentClient) -> None:
    app = App({"suspend": [503, 503, 200]})
    async with await serve(app):
        await call_hook(agent, app.hooks("suspend"), "suspend")
    assert [h for h, _ in app.seen] == ["suspend"] * 3


async def test_run_gets_the_payload_and_one_attempt(agent: AgentClient) -> None:
    app = App({"run": [503, 200]})
    async with await serve(app):
        with pytest.raises(GuestError, match=r"/run hook did not answer 200 within 2 s \(HTTP 503"):
            await call_hook(agent, app.hooks("run"), "run", b'{"user": 7}')
    assert app.seen == [("run", b'{"user": 7}')]


async def test_a_hook_that_never_answers_fails_at_its_timeout(agent: AgentClient) -> None:
    app = App({"terminate": [0]})
    async with await serve(app):
        with pytest.raises(GuestError, match="/terminate hook did not answer 200 within 1 s"):
            await call_hook(agent, app.hooks("terminate", timeout=1), "terminate")
    assert [h for h, _ in app.seen] == ["terminate"]


async def test_a_disabled_hook_is_not_called(agent: AgentClient) -> None:
    app = App({"resume": [500]})
    async with await serve(app):
        await call_hook(agent, app.hooks("run"), "resume")
    assert app.seen == []


def test_settings_outside_the_model_ranges_fall_back_to_the_defaults() -> None:
    hooks = RuntimeHooks.from_model(
        {"port": 70000, "microvmHooks": {"run": "ENABLED", "runTimeoutInSeconds": 3600,
                                         "suspend": "enabled", "resumeTimeoutInSeconds": "9"}}
    )  # fmt: skip
    assert hooks.port == 8080
    assert hooks.enabled == frozenset({"run"})
    assert hooks.timeout("run") == 1.0
    assert hooks.timeout("resume") == 1.0


def test_saved_settings_load_back_and_a_bad_file_means_no_hooks(tmp_path: Path) -> None:
    hooks = RuntimeHooks.from_model(
        {"port": 9000, "microvmHooks": {"suspend": "ENABLED", "suspendTimeoutInSeconds": 7}}
    )
    hooks.save(tmp_path / "vm.hooks.json")
    assert RuntimeHooks.load(tmp_path / "vm.hooks.json") == hooks
    (tmp_path / "bad.hooks.json").write_text('{"port": "x"')
    assert RuntimeHooks.load(tmp_path / "bad.hooks.json").enabled == frozenset()
    assert RuntimeHooks.load(tmp_path / "missing.hooks.json").enabled == frozenset()
