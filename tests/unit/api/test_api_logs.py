"""The log-streaming endpoints (``embervm.api.logs``) behind the real app and its SigV4 gate.

Plain requests go through httpx's ASGI transport; streaming behaviour (a follower whose client
goes away, the stream's time limit, a source that breaks mid-way) is driven through the ASGI
interface itself, announcing ASGI spec 2.4 — the version under which Starlette stops watching
for disconnects on its own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSRequest
from tests.framework.api_unit_harness import ENDPOINT, ApiHarness
from tests.framework.fake_api import sign

from embervm.api.logs import MAX_LINE_BYTES, Followers, LineStream, encode_line, log_routes
from embervm.core.caller import Caller
from embervm.errors import NotFoundError, ThrottledError

BUILD = "/embervm/v1/microvm-images/web/versions/3/logs"
APP = "/embervm/v1/microvms/mvm-1/logs"


@dataclass
class FakeLogSource:
    """``LogLines`` over canned lines; a follower waits for ``more`` after them."""

    build: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    app: dict[str, list[str]] = field(default_factory=dict)
    calls: list[tuple[str, str, bool, Caller | None]] = field(default_factory=list)
    more: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    broken: Exception | None = None  # raised by the generator after the canned lines
    open_error: Exception | None = None  # raised when the resource is looked up

    async def build_log_lines(
        self, image: str, version: str, follow: bool = False, *, caller: Caller | None = None
    ) -> AsyncIterator[str]:
        self.calls.append(("build", f"{image}/{version}", follow, caller))
        if self.open_error is not None:
            raise self.open_error
        if (image, version) not in self.build:
            raise NotFoundError(f"Image {image} version {version} not found")
        return self._lines(self.build[(image, version)], follow)

    async def app_log_lines(
        self, microvm_id: str, follow: bool = False, *, caller: Caller | None = None
    ) -> AsyncIterator[str]:
        self.calls.append(("app", microvm_id, follow, caller))
        if microvm_id not in self.app:
            raise NotFoundError(f"MicroVM {microvm_id} not found")
        return self._lines(self.app[microvm_id], follow)

    async def _lines(self, lines: list[str], follow: bool) -> AsyncIterator[str]:
        try:
            for line in lines:
                yield line
            if self.broken is not None:
                raise self.broken
            while follow:
                yield await self.more.get()
        finally:
            self.closed.set()


@pytest.fixture
async def logs(tmp_path: Path) -> AsyncIterator[tuple[ApiHarness, FakeLogSource]]:
    source = FakeLogSource()
    harness = ApiHarness(tmp_path, extra_routes=log_routes(source))
    async with harness.client:
        yield harness, source


def _signed_headers(api: ApiHarness, target: str, method: str = "GET") -> list[tuple[bytes, bytes]]:
    request = AWSRequest(method=method, url=ENDPOINT + target, data=b"")
    sign(request, api.credential.access_key_id, api.credential.secret_access_key)
    headers = [(k.lower().encode(), str(v).encode()) for k, v in request.prepare().headers.items()]
    return [(b"host", b"testserver"), *headers]


@dataclass
class AsgiCall:
    """One request straight through the ASGI interface, with a client that can go away."""

    messages: list[MutableMapping[str, Any]] = field(default_factory=list)
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    sent: asyncio.Condition = field(default_factory=asyncio.Condition)
    _body_sent: bool = False

    async def receive(self) -> dict[str, Any]:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        async with self.sent:
            self.messages.append(message)
            self.sent.notify_all()

    async def received(self, data: bytes) -> None:
        """Until the client has received ``data``."""
        async with self.sent:
            await self.sent.wait_for(lambda: data in self.body)

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if "body" in m)

    @property
    def finished(self) -> bool:
        return any(
            m["type"] == "http.response.body" and not m.get("more_body", False)
            for m in self.messages
        )


def _scope(api: ApiHarness, path: str, query: bytes = b"", method: str = "GET") -> dict[str, Any]:
    target = path + (f"?{query.decode()}" if query else "")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": _signed_headers(api, target, method),
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


async def test_build_log_lines_stream_as_text_one_record_per_line(
    logs: tuple[ApiHarness, FakeLogSource],
) -> None:
    api, source = logs
    records = [json.dumps({"stream": "build", "message": f"step {n}/2"}) for n in (1, 2)]
    source.build[("web", "3")] = records
    response = await api.signed_raw("GET", BUILD)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text.splitlines() == records
    kind, resource, follow, caller = source.calls[-1]
    assert (kind, resource, follow) == ("build", "web/3", False)
    assert caller is not None
    assert caller.access_key_id == api.credential.access_key_id
    assert source.closed.is_set()


async def test_app_log_lines_without_follow_send_what_is_there_and_end(
    logs: tuple[ApiHarness, FakeLogSource],
) -> None:
    api, source = logs
    source.app["mvm-1"] = ["listening on 8080", "GET / 200"]
    source.more.put_nowait("a line a follower would get")
    for query in ("", "?follow=false", "?follow=0"):
        response = await api.signed_raw("GET", APP + query)
        assert response.text == "listening on 8080\nGET / 200\n"
        assert source.calls[-1][2] is False
        assert source.calls[-1][3] is not None


@pytest.mark.parametrize("path", [BUILD.replace("/3/", "/9/"), APP.replace("mvm-1", "mvm-404")])
async def test_unknown_resource_is_the_models_404(
    logs: tuple[ApiHarness, FakeLogSource], path: str
) -> None:
    api, _ = logs
    response = await api.signed_raw("GET", path)
    assert response.status_code == 404
    assert response.headers["x-amzn-errortype"] == "ResourceNotFoundException"
    assert "not found" in response.json()["message"]


async def test_a_bad_follow_value_is_a_validation_error_before_core_is_asked(
    logs: tuple[ApiHarness, FakeLogSource],
) -> None:
    api, source = logs
    source.app["mvm-1"] = []
    response = await api.signed_raw("GET", APP + "?follow=forever")
    assert response.status_code == 400
    assert response.headers["x-amzn-errortype"] == "ValidationException"
    assert source.calls == []


async def test_unsigned_and_forged_requests_never_reach_the_source(
    logs: tuple[ApiHarness, FakeLogSource],
) -> None:
    api, source = logs
    source.app["mvm-1"] = ["secret app output"]
    unsigned = await api.client.get(APP)
    assert unsigned.status_code == 403
    headers = dict((k.decode(), v.decode()) for k, v in _signed_headers(api, APP) if k != b"host")
    forged = await api.client.get(APP.replace("mvm-1", "mvm-2"), headers=headers)
    assert forged.status_code == 403
    assert "secret" not in unsigned.text + forged.text
    assert source.calls == []


async def test_a_crash_while_looking_up_is_an_internal_error_without_details(
    logs: tuple[ApiHarness, FakeLogSource],
) -> None:
    api, source = logs
    source.open_error = RuntimeError("database password is hunter2")
    response = await api.signed_raw("GET", BUILD)
    assert response.status_code == 500
    assert response.headers["x-amzn-errortype"] == "InternalServerException"
    assert "hunter2" not in response.text


async def test_lines_are_bounded_and_never_split_a_record_or_a_character(
    logs: tuple[ApiHarness, FakeLogSource],
) -> None:
    api, source = logs
    huge = "é" * MAX_LINE_BYTES  # two bytes each: twice the limit
    source.app["mvm-1"] = ["one\ntwo\r\nthree", huge, "after"]
    response = await api.signed_raw("GET", APP)
    lines = response.content.split(b"\n")
    assert lines[0] == b"one two  three"
    assert len(lines[1]) == MAX_LINE_BYTES
    assert lines[1].decode() == "é" * (MAX_LINE_BYTES // 2)
    assert lines[2:] == [b"after", b""]
    odd = encode_line("x" + "é" * MAX_LINE_BYTES)  # the cut falls inside a character
    assert len(odd) == MAX_LINE_BYTES  # one byte dropped rather than half a character kept
    odd.decode()


async def test_a_log_read_at_once_goes_out_in_big_chunks() -> None:
    source = FakeLogSource(app={"mvm-1": [f"line {n}" for n in range(5000)]})
    call = AsgiCall()
    lines = await source.app_log_lines("mvm-1", follow=False)
    async with asyncio.timeout(10):
        await LineStream(lines)({"type": "http"}, call.receive, call.send)
    assert call.body.decode().splitlines() == [f"line {n}" for n in range(5000)]
    assert len(call.messages) < 50  # not one write per line
    assert call.finished


async def test_head_answers_whether_the_log_exists_without_streaming(
    logs: tuple[ApiHarness, FakeLogSource],
) -> None:
    api, source = logs
    source.app["mvm-1"] = ["a"]
    call = AsgiCall()
    await api.app(_scope(api, APP, b"follow=true", method="HEAD"), call.receive, call.send)
    assert call.messages[0]["status"] == 200
    assert call.body == b""
    assert call.finished


async def test_a_follower_gets_new_lines_and_its_source_closes_when_the_client_leaves(
    logs: tuple[ApiHarness, FakeLogSource],
) -> None:
    api, source = logs
    source.app["mvm-1"] = ["first"]
    call = AsgiCall()
    served = asyncio.create_task(api.app(_scope(api, APP, b"follow=true"), call.receive, call.send))
    async with asyncio.timeout(10):
        await call.received(b"first\n")
        source.more.put_nowait("second")
        await call.received(b"second\n")
        assert not served.done()  # nothing more to say yet: still following
        call.gone.set()  # the client goes away while no line is coming
        await served
        await source.closed.wait()
    assert call.messages[0]["status"] == 200
    assert call.body == b"first\nsecond\n"
    assert source.calls[-1][:3] == ("app", "mvm-1", True)


async def test_a_follow_ends_cleanly_at_its_time_limit_and_closes_its_source() -> None:
    source = FakeLogSource(app={"mvm-1": ["only line"]})
    call = AsgiCall()
    lines = await source.app_log_lines("mvm-1", follow=True)
    async with asyncio.timeout(10):
        await LineStream(lines, max_seconds=0.2)({"type": "http"}, call.receive, call.send)
    assert call.body == b"only line\n"
    assert call.finished
    assert source.closed.is_set()


async def test_a_source_breaking_mid_stream_never_looks_like_a_complete_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = FakeLogSource(app={"mvm-1": ["partial"]}, broken=OSError("disk gone"))
    call = AsgiCall()
    lines = await source.app_log_lines("mvm-1", follow=False)
    async with asyncio.timeout(10):
        await LineStream(lines)({"type": "http"}, call.receive, call.send)
    assert call.body == b"partial\n"
    assert not call.finished  # the server closes the connection: the client sees a break
    assert "disk gone" in caplog.text


async def test_followers_over_the_per_key_cap_are_throttled_until_one_leaves(
    tmp_path: Path,
) -> None:
    source = FakeLogSource(app={"mvm-1": ["first"]})
    api = ApiHarness(tmp_path, extra_routes=log_routes(source, Followers(limit=10, per_key=2)))
    calls, served = [], []
    async with api.client, asyncio.timeout(10):
        for _ in range(2):
            call = AsgiCall()
            scope = _scope(api, APP, b"follow=true")
            served.append(asyncio.create_task(api.app(scope, call.receive, call.send)))
            await call.received(b"first\n")
            calls.append(call)
        looked_up = len(source.calls)
        refused = await api.signed_raw("GET", APP + "?follow=true")
        assert refused.status_code == 429
        assert refused.headers["x-amzn-errortype"] == "ThrottlingException"
        assert refused.headers["retry-after"] == "5"
        assert "already follows 2 logs" in refused.json()["message"]
        assert len(source.calls) == looked_up  # refused before the log was opened
        assert (await api.signed_raw("GET", APP)).status_code == 200  # reading is not following
        calls[0].gone.set()  # one follower leaves: its slot is free again
        await served[0]
        call = AsgiCall()
        again = asyncio.create_task(
            api.app(_scope(api, APP, b"follow=true"), call.receive, call.send)
        )
        await call.received(b"first\n")
        for leaving in (calls[1], call):
            leaving.gone.set()
        await asyncio.gather(served[1], again)


def test_followers_are_capped_per_server_and_slots_come_back_once() -> None:
    followers = Followers(limit=2, per_key=2)
    give_back_a = followers.take("AKIDA")
    followers.take("AKIDB")
    with pytest.raises(ThrottledError, match="already streams 2 followed logs"):
        followers.take("AKIDC")
    give_back_a()
    give_back_a()  # twice is once
    assert followers.open == 1
    followers.take("AKIDC")
    assert followers.open == 2


async def test_a_refused_lookup_gives_its_follower_slot_back(tmp_path: Path) -> None:
    followers = Followers(limit=1, per_key=1)
    api = ApiHarness(tmp_path, extra_routes=log_routes(FakeLogSource(), followers))
    async with api.client:
        for _ in range(3):
            assert (await api.signed_raw("GET", APP + "?follow=true")).status_code == 404
    assert followers.open == 0
