"""The HTTP/2 frame layer (``h2.frame_layer``) without I/O: the client's side
(``tests.framework.proxy_h2_frame_client``) is written with hyperframe and hpack (h2's own
parts), so every check sees the bytes a peer would."""

from __future__ import annotations

import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from tests.framework.proxy_h2_frame_client import (
    Client,
    Headers,
    Recorder,
    data,
    goaway,
    raw,
    request,
    resets,
    u32,
)

from embervm.proxy.h2.fields import Malformed, check_fields
from embervm.proxy.h2.frame_layer import (
    ABUSE_CREDIT,
    COMPRESSION_ERROR,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    MAX_HEADER_BLOCK,
    MAX_STREAMS,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    STREAM_CLOSED,
    WINDOW,
    H2Server,
)


@pytest.fixture
def client() -> Client:
    made = Client()
    made.read()
    return made


def test_the_server_speaks_first_with_its_limits_and_acknowledges_the_clients_settings() -> None:
    made = Client()
    frames = made.read()
    ours = frames[0]
    assert isinstance(ours, SettingsFrame)
    assert "ACK" not in ours.flags
    assert ours.settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == MAX_STREAMS
    assert ours.settings[SettingsFrame.INITIAL_WINDOW_SIZE] == WINDOW
    grant = frames[1]
    assert isinstance(grant, WindowUpdateFrame)
    assert grant.window_increment == WINDOW - 65535
    assert isinstance(frames[2], SettingsFrame)
    assert "ACK" in frames[2].flags


def test_a_request_and_its_answer(client: Client) -> None:
    frames = client.send(client.headers(1, request(b"/a?b", (b"x-one", b"1")), "END_STREAM"))
    assert frames == []
    got, ended = client.recorder.requests[1]
    assert (got.method, got.path, got.authority, got.fields, ended) == (
        b"GET", b"/a?b", b"vm.example", [(b"x-one", b"1")], True)  # fmt: skip
    client.server.send_headers(1, [(b":status", b"200"), (b"content-length", b"5")])
    assert client.server.send_data(1, b"hello", end=True)
    head, body = client.read()
    assert isinstance(head, HeadersFrame)
    assert isinstance(body, DataFrame)
    assert client.decoder.decode(head.data) == [(":status", "200"), ("content-length", "5")]
    assert (body.data, "END_STREAM" in body.flags) == (b"hello", True)
    assert client.server.streams == {}


def test_no_preface_is_a_connection_error() -> None:
    server = H2Server(Recorder())
    server.out.clear()
    server.receive(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 16)
    assert server.closed
    made = Client.__new__(Client)
    made.server = server
    assert goaway(made.read()) == PROTOCOL_ERROR


@pytest.mark.parametrize(
    "headers",
    [
        request(b"/", (b"x-evil", b"a\r\nx-injected: 1")),
        request(b"/", (b"x-evil", b"a\nb")),
        request(b"/", (b"x-evil", b"a\x00b")),
        request(b"/", (b"x-evil", b"\x7f")),
        request(b"/", (b"x-evil", b" padded")),
        request(b"/", (b"X-Upper", b"1")),
        request(b"/", (b"bad name", b"1")),
        request(b"/", (b"", b"1")),
        request(b"/", (b"connection", b"close")),
        request(b"/", (b"transfer-encoding", b"chunked")),
        request(b"/", (b"te", b"gzip")),
        request(b"/ HTTP/1.1\r\nx:"),
        request(b"/", (b"content-length", b"1"), (b"content-length", b"2")),
        request(b"/", (b"content-length", b"-1")),
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"vm.example")],
        [(b":method", b"CONNECT"), (b":authority", b"vm.example:443")],
        [*request(), (b":method", b"POST")],
        [(b"x-first", b"1"), *request()],
        [*request(), (b":status", b"200")],
        [(b":method", b"G T"), (b":scheme", b"http"), (b":path", b"/")],
        [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":path", b"/"),
            (b":authority", b"vm\r\nx: 1"),
        ],
    ],
)
def test_a_malformed_request_is_reset_and_never_seen(client: Client, headers: Headers) -> None:
    frames = client.send(client.headers(1, headers, "END_STREAM"))
    assert resets(frames) == {1: PROTOCOL_ERROR}
    assert client.recorder.requests == {}
    assert not client.server.closed  # a stream error: the connection goes on
    client.send(client.headers(3, request(), "END_STREAM"))
    assert 3 in client.recorder.requests


@pytest.mark.parametrize("value", [b" a", b"a ", b"\ta", b"a\t", b" ", b"\t", b"a b "])
@pytest.mark.parametrize("position", [0, 1, 2])
def test_whitespace_at_either_end_of_any_value_is_malformed(value: bytes, position: int) -> None:
    fields = [(b"x-a", b"1"), (b"x-b", b"2 3")]
    fields.insert(position, (b"x-c", value))
    with pytest.raises(Malformed):
        check_fields(fields)
    extra = [b"GET", b"/"]
    extra.insert(position, value)  # pseudo-header values are values too
    with pytest.raises(Malformed):
        check_fields([(b"x-a", b"1")], tuple(extra))


def test_inner_whitespace_and_empty_values_are_fine() -> None:
    check_fields([(b"x-a", b""), (b"x-b", b"a \t b"), (b"x-c", b"")], (b"GET", b"", b"/"))
    check_fields([(b"x-a", b"")])


def test_a_body_longer_or_shorter_than_its_length_is_reset(client: Client) -> None:
    post = [(b":method", b"POST"), *request()[1:], (b"content-length", b"4")]
    assert resets(client.send(client.headers(1, post), data(1, b"12345"))) == {
        1: PROTOCOL_ERROR}  # fmt: skip
    assert 1 in client.recorder.resets
    assert client.recorder.data == {}
    assert resets(client.send(client.headers(3, post), data(3, b"123", "END_STREAM"))) == {
        3: PROTOCOL_ERROR}  # fmt: skip
    assert resets(client.send(client.headers(5, post, "END_STREAM"))) == {5: PROTOCOL_ERROR}
    client.send(client.headers(7, post), data(7, b"12"), data(7, b"34", "END_STREAM"))
    assert (client.recorder.data[7], client.recorder.ended) == (b"1234", [7])


def test_streams_beyond_the_limit_are_refused_and_their_headers_still_decoded(
    client: Client,
) -> None:
    for stream_id in range(1, 2 * MAX_STREAMS, 2):
        client.send(client.headers(stream_id, request()))
    over = 2 * MAX_STREAMS + 1
    # a new field, indexed by the encoder: the refused block must still reach HPACK's table
    frames = client.send(client.headers(over, request(b"/", (b"x-new", b"remembered"))))
    assert resets(frames) == {over: REFUSED_STREAM}
    client.server.reset(1)
    client.send(client.headers(over + 2, request(b"/", (b"x-new", b"remembered"))))
    assert client.recorder.requests[over + 2][0].fields == [(b"x-new", b"remembered")]


def test_a_reset_stream_frees_its_place_and_is_reported(client: Client) -> None:
    client.send(client.headers(1, request()))
    frame = RstStreamFrame(1)
    frame.error_code = 0x8
    assert client.send(frame) == []
    assert client.recorder.resets == [1]
    assert client.server.streams == {}


def test_rapid_reset_ends_the_connection(client: Client) -> None:
    frames: list[Frame] = []
    for stream_id in range(1, 4 * ABUSE_CREDIT, 2):
        cancel = RstStreamFrame(stream_id)
        cancel.error_code = 0x8
        frames += client.send(client.headers(stream_id, request(), "END_STREAM"), cancel)
        if client.server.closed:
            break
    assert goaway(frames) == ENHANCE_YOUR_CALM
    assert len(client.recorder.resets) < ABUSE_CREDIT


def test_completed_streams_earn_back_what_resets_spend(client: Client) -> None:
    for stream_id in range(1, 6 * ABUSE_CREDIT, 4):  # one reset, one answered, and again
        cancel = RstStreamFrame(stream_id)
        cancel.error_code = 0x8
        client.send(client.headers(stream_id, request(), "END_STREAM"), cancel)
        client.send(client.headers(stream_id + 2, request(), "END_STREAM"))
        client.server.send_headers(stream_id + 2, [(b":status", b"204")], end=True)
    assert not client.server.closed


def test_flow_control_holds_what_the_client_has_no_window_for() -> None:
    client = Client({SettingsFrame.INITIAL_WINDOW_SIZE: 10})
    client.read()
    client.send(client.headers(1, request(), "END_STREAM"))
    client.server.send_headers(1, [(b":status", b"200")])
    assert not client.server.send_data(1, b"x" * 25, end=True)
    sent = [f for f in client.read() if isinstance(f, DataFrame)]
    assert [len(f.data) for f in sent] == [10]
    assert "END_STREAM" not in sent[0].flags
    frames = client.send(WindowUpdateFrame(1, window_increment=10))
    assert [len(f.data) for f in frames] == [10]
    assert client.recorder.drained == []
    frames = client.send(WindowUpdateFrame(1, window_increment=100))
    assert [(len(f.data), "END_STREAM" in f.flags) for f in frames] == [(5, True)]
    assert client.recorder.drained == [1]
    assert client.server.streams == {}


def test_trailers_wait_behind_held_data() -> None:
    client = Client({SettingsFrame.INITIAL_WINDOW_SIZE: 3})
    client.read()
    client.send(client.headers(1, request(), "END_STREAM"))
    client.server.send_headers(1, [(b":status", b"200")])
    client.server.send_data(1, b"abcdef")
    client.server.send_headers(1, [(b"grpc-status", b"0")], end=True)
    frames = client.read()
    assert [type(f) for f in frames] == [HeadersFrame, DataFrame]
    frames = client.send(WindowUpdateFrame(1, window_increment=3))
    assert [type(f) for f in frames] == [DataFrame, HeadersFrame]
    assert "END_STREAM" in frames[1].flags
    assert client.server.streams == {}


def test_the_client_window_is_renewed_only_for_what_was_consumed(client: Client) -> None:
    post = [(b":method", b"POST"), *request()[1:]]
    chunk = b"x" * 16384
    client.send(client.headers(1, post), *[data(1, chunk) for _ in range(40)])
    assert len(client.recorder.data[1]) == 40 * 16384
    assert client.read() == []  # nothing consumed yet: no WINDOW_UPDATE
    client.server.consumed(1, 40 * 16384)
    grants = {f.stream_id: f.window_increment for f in client.read()}
    assert grants == {0: 40 * 16384, 1: 40 * 16384}


def test_sending_beyond_the_granted_window_is_a_connection_error(client: Client) -> None:
    post = [(b":method", b"POST"), *request()[1:]]
    chunk = b"x" * 16384
    too_much = [data(1, chunk) for _ in range(WINDOW // 16384 + 1)]
    frames = client.send(client.headers(1, post), *too_much)
    assert goaway(frames) == FLOW_CONTROL_ERROR


def test_a_reset_stream_gives_its_unconsumed_bytes_back_to_the_connection(client: Client) -> None:
    post = [(b":method", b"POST"), *request()[1:]]
    client.send(client.headers(1, post), *[data(1, b"x" * 16384) for _ in range(40)])
    cancel = RstStreamFrame(1)
    cancel.error_code = 0x8
    frames = client.send(cancel)
    assert {f.stream_id: f.window_increment for f in frames} == {0: 40 * 16384}


def test_trailers_are_handed_over_and_must_end_the_stream(client: Client) -> None:
    post = [(b":method", b"POST"), *request()[1:]]
    client.send(client.headers(1, post), data(1, b"body"),
                client.headers(1, [(b"grpc-timeout", b"1S")], "END_STREAM"))  # fmt: skip
    assert client.recorder.trailers == {1: [(b"grpc-timeout", b"1S")]}
    assert client.recorder.ended == [1]
    frames = client.send(client.headers(3, post), client.headers(3, [(b"x", b"1")]))
    assert resets(frames) == {3: PROTOCOL_ERROR}
    pseudo = client.headers(5, [(b":path", b"/")], "END_STREAM")
    frames = client.send(client.headers(5, post), pseudo)
    assert resets(frames) == {5: PROTOCOL_ERROR}


def test_a_header_block_arrives_in_continuation_frames(client: Client) -> None:
    block = client.encoder.encode(request(b"/long", (b"x-big", b"v" * 3000)))
    first = HeadersFrame(1, block[:100])
    first.flags = {"END_STREAM"}
    middle = ContinuationFrame(1, block[100:2000])
    last = ContinuationFrame(1, block[2000:])
    last.flags = {"END_HEADERS"}
    client.send(first, middle, last)
    assert client.recorder.requests[1][0].fields == [(b"x-big", b"v" * 3000)]


def test_endless_continuation_frames_end_the_connection(client: Client) -> None:
    first = HeadersFrame(1, client.encoder.encode(request()))
    frames: list[Frame] = client.send(first)
    for _ in range(MAX_HEADER_BLOCK // 9 + 1):  # empty ones: only their headers count
        frames += client.send(ContinuationFrame(1, b""))
        if client.server.closed:
            break
    assert goaway(frames) == ENHANCE_YOUR_CALM
    assert client.recorder.requests == {}


def test_another_frame_inside_a_header_block_is_a_connection_error(client: Client) -> None:
    first = HeadersFrame(1, client.encoder.encode(request()))
    assert goaway(client.send(first, PingFrame(0))) == PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (raw(0x0, 0, 1, b"x"), PROTOCOL_ERROR),  # DATA on an idle stream
        (raw(0x0, 0, 0, b"x"), PROTOCOL_ERROR),  # DATA on the connection
        (raw(0x8, 0, 0, u32(0)), PROTOCOL_ERROR),  # a zero WINDOW_UPDATE
        (raw(0x8, 0, 0, u32(2**31 - 1)), FLOW_CONTROL_ERROR),  # the window overflows
        (raw(0x8, 0, 7, u32(1)), PROTOCOL_ERROR),  # WINDOW_UPDATE on an idle stream
        (raw(0x8, 0, 0, b"\x00\x01"), FRAME_SIZE_ERROR),
        (raw(0x3, 0, 0, u32(8)), PROTOCOL_ERROR),  # RST_STREAM on the connection
        (raw(0x3, 0, 9, u32(8)), PROTOCOL_ERROR),  # RST_STREAM on an idle stream
        (raw(0x3, 0, 1, b"\x00\x00\x08"), FRAME_SIZE_ERROR),
        (raw(0x5, 0x4, 1, u32(2)), PROTOCOL_ERROR),  # PUSH_PROMISE from a client
        (raw(0x9, 0x4, 1), PROTOCOL_ERROR),  # CONTINUATION without HEADERS
        (raw(0x6, 0, 1, b"x" * 8), PROTOCOL_ERROR),  # PING on a stream
        (raw(0x6, 0, 0, b"x" * 7), FRAME_SIZE_ERROR),
        (raw(0x4, 0, 1), PROTOCOL_ERROR),  # SETTINGS on a stream
        (raw(0x4, 0, 0, b"x" * 5), FRAME_SIZE_ERROR),
        (raw(0x4, 0x1, 0, b"\x00" * 6), FRAME_SIZE_ERROR),  # an ACK with a payload
        (raw(0x4, 0, 0, b"\x00\x04" + u32(2**31)), FLOW_CONTROL_ERROR),  # INITIAL_WINDOW_SIZE
        (raw(0x4, 0, 0, b"\x00\x05" + u32(4096)), PROTOCOL_ERROR),  # MAX_FRAME_SIZE too small
        (raw(0x4, 0, 0, b"\x00\x02" + u32(2)), PROTOCOL_ERROR),  # ENABLE_PUSH neither 0 nor 1
        (raw(0x7, 0, 1, u32(0) + u32(0)), PROTOCOL_ERROR),  # GOAWAY on a stream
        (raw(0x7, 0, 0, u32(0)), FRAME_SIZE_ERROR),
        (raw(0x1, 0x4, 2, b"\x82"), PROTOCOL_ERROR),  # a stream id only a server may use
        (raw(0x1, 0x4, 1, b"\xff\xff\xff\xff"), COMPRESSION_ERROR),  # not HPACK
        (raw(0x1, 0x4 | 0x8, 1, b"\x09\x82"), PROTOCOL_ERROR),  # padding beyond the frame
        (raw(0x0, 0, 1, b"x" * 16385), FRAME_SIZE_ERROR),  # beyond SETTINGS_MAX_FRAME_SIZE
    ],
)
def test_frames_that_break_the_rules_end_the_connection(
    client: Client, frame: bytes, code: int
) -> None:
    client.server.receive(frame)
    assert goaway(client.read()) == code
    assert client.server.closed
    client.server.receive(raw(0x6, 0, 0, b"x" * 8))
    assert client.read() == []  # nothing is read after a connection error


def test_ping_is_answered_and_unknown_frames_are_ignored(client: Client) -> None:
    frames = client.send(PingFrame(0, opaque_data=b"12345678"))
    assert len(frames) == 1
    assert isinstance(frames[0], PingFrame)
    assert (frames[0].opaque_data, "ACK" in frames[0].flags) == (b"12345678", True)
    client.server.receive(raw(0xFA, 0, 0, b"whatever"))  # an extension frame
    assert client.read() == []
    assert client.send(PriorityFrame(1, depends_on=0)) == []
    assert resets(client.send(PriorityFrame(3, depends_on=3))) == {}  # PRIORITY is ignored
    assert not client.server.closed


@pytest.mark.parametrize("kind", ["priority", "empty data", "unknown"])
def test_floods_of_frames_that_bring_nothing_end_the_connection(client: Client, kind: str) -> None:
    client.send(client.headers(1, [(b":method", b"POST"), *request()[1:]]))
    flood = {"priority": raw(0x2, 0, 3, u32(1) + b"\x10"), "empty data": raw(0x0, 0, 1),
             "unknown": raw(0xFA, 0, 0, b"x")}[kind]  # fmt: skip
    client.server.receive(flood * (ABUSE_CREDIT - 2))
    assert goaway(client.read()) is None  # a few are fine
    client.server.receive(flood * 2)
    assert goaway(client.read()) == ENHANCE_YOUR_CALM


def test_the_server_ends_a_stream_the_client_still_sends_on(client: Client) -> None:
    post = [(b":method", b"POST"), *request()[1:]]
    client.send(client.headers(1, post), data(1, b"part"))
    client.server.send_headers(1, [(b":status", b"403")], end=True)
    frames = client.read()
    assert resets(frames) == {1: NO_ERROR}  # RFC 9113 §8.1: the client may stop sending
    later = client.send(data(1, b"more"))
    assert resets(later) == {}
    assert goaway(later) is None  # in flight: ignored


def test_data_after_the_client_ended_the_stream_is_a_stream_error(client: Client) -> None:
    client.send(client.headers(1, request(), "END_STREAM"))
    assert resets(client.send(data(1, b"late"))) == {1: STREAM_CLOSED}
    assert client.recorder.resets == [1]


def test_a_client_goaway_lets_open_streams_finish_and_takes_no_new_ones(client: Client) -> None:
    client.send(client.headers(1, request(), "END_STREAM"))
    client.send(GoAwayFrame(0, last_stream_id=0))
    assert client.server.goaway_received
    client.send(client.headers(3, request(), "END_STREAM"))
    assert list(client.recorder.requests) == [1]
    client.server.send_headers(1, [(b":status", b"204")], end=True)
    assert isinstance(client.read()[0], HeadersFrame)
