"""The frame layer against clients whose frames cost us and bring nothing (audit A2, issue #11
§5): the work each frame makes is counted (streams visited, streams walked), never timed."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hyperframe.frame import RstStreamFrame, SettingsFrame, WindowUpdateFrame
from tests.framework.proxy_h2_frame_client import (
    Client,
    Recorder,
    data,
    goaway,
    raw,
    request,
    resets,
    u32,
)

from embervm.proxy.h2.frame_layer import ABUSE_CREDIT, ENHANCE_YOUR_CALM, PROTOCOL_ERROR, H2Server
from embervm.proxy.h2.frames import Stream

BLOCKED = 256


@pytest.fixture
def client() -> Client:
    made = Client()
    made.read()
    return made


class Answerer(Recorder):
    """A session that answers every request at once with ``body`` (and ends the stream when
    ``end``): a 404 as ``h2.session`` answered it before A2, or an app's answer still going on."""

    def __init__(self, server: H2Server, body: bytes, end: bool) -> None:
        super().__init__()
        self.server, self.body, self.end = server, body, end

    def on_request(self, stream_id: int, request: object, ended: bool) -> None:
        self.server.send_headers(stream_id, [(b":status", b"404")])
        self.server.send_data(stream_id, self.body, end=self.end)


def count_visits(server: H2Server) -> Callable[[], int]:
    """Count the streams the frame layer tries to send for (each ``_flush``)."""
    visits = 0
    flush = server._flush

    def counted(stream: Stream) -> bool:
        nonlocal visits
        visits += 1
        return flush(stream)

    server._flush = counted  # type: ignore[method-assign]
    return lambda: visits


def blocked_client(window: int, body: bytes = b"Unknown endpoint\n", end: bool = True) -> Client:
    client = Client({SettingsFrame.INITIAL_WINDOW_SIZE: window})
    client.server.handler = Answerer(client.server, body, end)
    client.read()
    for stream_id in range(1, 2 * BLOCKED, 2):
        client.send(client.headers(stream_id, request(), "END_STREAM"))
    return client


def test_window_updates_that_unblock_nothing_visit_no_stream_and_end_the_connection() -> None:
    client = blocked_client(0)  # 256 answers held, each for its own window
    assert len(client.server.streams) == BLOCKED
    visits = count_visits(client.server)
    flood = raw(0x8, 0, 0, u32(1)) * (16384 // 13)  # 16 KiB of WINDOW_UPDATE(0, +1)
    client.server.receive(flood)
    assert visits() == 0
    assert goaway(client.read()) == ENHANCE_YOUR_CALM


def test_a_connection_window_granted_byte_by_byte_visits_one_stream_per_grant() -> None:
    client = blocked_client(1 << 20, b"x" * 300, end=False)  # 76,800 bytes for a 65,535 window
    client.read()
    assert client.server.window(2 * BLOCKED - 1) == 0
    visits = count_visits(client.server)
    grants = 16384 // 13
    client.server.receive(raw(0x8, 0, 0, u32(1)) * grants)
    assert visits() <= grants  # was 256 per grant: every held stream, every time
    assert not client.server.closed  # each grant sent a byte: progress, not abuse


def test_a_settings_frame_walks_the_streams_once_whatever_its_entries() -> None:
    client = blocked_client(0)
    visits = count_visits(client.server)
    entries = b"".join(b"\x00\x04" + u32(value) for value in [0, 1] * 1365)  # 2,730 entries
    client.server.receive(raw(0x4, 0, 0, entries))
    assert visits() == BLOCKED  # each held stream sent its one byte, once
    assert all(stream.send_window == 0 for stream in client.server.streams.values())
    assert not client.server.closed


def test_settings_frames_after_the_first_spend_credit() -> None:
    client = blocked_client(0)
    flips = [raw(0x4, 0, 0, b"\x00\x04" + u32(value % 2)) for value in range(ABUSE_CREDIT)]
    client.server.receive(b"".join(flips))
    assert goaway(client.read()) == ENHANCE_YOUR_CALM  # each walked 256 streams: 9 credits


def test_unsolicited_settings_acks_spend_credit(client: Client) -> None:
    client.server.receive(raw(0x4, 0x1, 0) * (ABUSE_CREDIT + 1))  # the first one is due
    assert goaway(client.read()) == ENHANCE_YOUR_CALM


def test_window_updates_that_give_back_our_data_are_free() -> None:
    client = Client({SettingsFrame.INITIAL_WINDOW_SIZE: 3 * 16384})
    client.read()
    client.send(client.headers(1, request(), "END_STREAM"))
    client.server.send_headers(1, [(b":status", b"200")])
    for _ in range(ABUSE_CREDIT):  # a long download, the client granting each frame it reads
        client.server.send_data(1, b"x" * 3 * 16384)
        grants = [WindowUpdateFrame(stream_id, window_increment=16384)
                  for _ in range(3) for stream_id in (0, 1)]  # fmt: skip
        client.send(*grants)
    assert not client.server.closed
    assert client.server.held_bytes == 0


@pytest.mark.parametrize(
    "frame",
    [
        raw(0x0, 0, 1, b"x"),  # DATA
        raw(0x8, 0, 1, u32(1)),  # WINDOW_UPDATE
        raw(0x3, 0, 1, u32(8)),  # RST_STREAM
    ],
    ids=["data", "window_update", "rst_stream"],
)
def test_frames_on_closed_streams_spend_credit(client: Client, frame: bytes) -> None:
    client.send(client.headers(1, request(), "END_STREAM"))
    client.server.send_headers(1, [(b":status", b"204")], end=True)  # closed by both sides
    client.server.receive(frame * (ABUSE_CREDIT - 2))
    assert goaway(client.read()) is None
    client.server.receive(frame * 4)
    assert goaway(client.read()) == ENHANCE_YOUR_CALM


def test_data_in_flight_when_we_answered_early_is_free_up_to_the_window(client: Client) -> None:
    post = [(b":method", b"POST"), *request()[1:]]
    for stream_id in range(1, 40, 2):  # 20 uploads answered (401) before their body came
        client.send(client.headers(stream_id, post))
        client.server.send_headers(stream_id, [(b":status", b"401")], end=True)
        client.send(*[data(stream_id, b"x" * 16384) for _ in range(64)])  # its whole window
    assert not client.server.closed
    client.server.receive(raw(0x0, 0, 39, b"x") * ABUSE_CREDIT)  # beyond it: abuse
    assert goaway(client.read()) == ENHANCE_YOUR_CALM


def test_trailers_on_a_stream_we_reset_are_ignored_but_spend_credit(client: Client) -> None:
    post = [(b":method", b"POST"), *request()[1:]]
    client.send(client.headers(1, post), data(1, b"part"))
    client.server.reset(1)
    trailers = client.headers(1, [(b"x-t", b"1")], "END_STREAM")
    for _ in range(ABUSE_CREDIT):
        frames = client.send(trailers)
        if client.server.closed:
            break
    assert goaway(frames) == ENHANCE_YOUR_CALM


def test_a_stream_opened_below_one_already_used_is_a_connection_error(client: Client) -> None:
    client.send(client.headers(5, request(), "END_STREAM"))
    frames = client.send(client.headers(3, request(), "END_STREAM"))
    assert goaway(frames) == PROTOCOL_ERROR
    assert list(client.recorder.requests) == [5]


def test_headers_on_a_stream_both_sides_closed_is_a_connection_error(client: Client) -> None:
    client.send(client.headers(1, request(), "END_STREAM"))
    client.server.send_headers(1, [(b":status", b"204")], end=True)
    assert resets(client.read()) == {}
    assert goaway(client.send(client.headers(1, request(), "END_STREAM"))) == PROTOCOL_ERROR


def test_a_refused_stream_may_still_send_its_trailers(client: Client) -> None:
    post = [(b":method", b"POST"), *request()[1:]]
    frame = client.headers(3, [(b":method", b"POST")])  # malformed: reset at once
    client.send(client.headers(1, post), frame)
    trailers = client.headers(3, [(b"x-t", b"1")], "END_STREAM")
    cancel = RstStreamFrame(1)
    cancel.error_code = 0x8
    frames = client.send(trailers, cancel)
    assert goaway(frames) is None
