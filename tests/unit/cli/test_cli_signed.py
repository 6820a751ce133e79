"""``cli/_signed.py``: uploads and log streams, signed as the server verifies them (the API's own
``SigV4Verifier`` checks every request here), and their failures mapped to exit codes.

httpx is answered by a ``MockTransport``: no socket is opened."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from embervm.api.sigv4 import SigV4Verifier
from embervm.cli import _signed
from embervm.cli._context import (
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_NOT_FOUND,
    EXIT_UNREACHABLE,
    CliContext,
    CliError,
)

KEY, SECRET = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
Handler = Callable[[httpx.Request], httpx.Response]


class _Secrets:
    def secret_for(self, access_key_id: str) -> str | None:
        return SECRET if access_key_id == KEY else None


def _verify(request: httpx.Request, *, streamed: bool) -> None:
    """What the server does with the head (and, unless streamed, the body) of a request."""
    raw_path, _, raw_query = request.url.raw_path.decode().partition("?")
    SigV4Verifier(_Secrets()).verify(
        method=request.method,
        raw_path=raw_path,
        raw_query=raw_query,
        headers=request.headers.multi_items(),
        body=None if streamed else request.content,
    )


@pytest.fixture
def signed_ctx(ctx: CliContext, monkeypatch: pytest.MonkeyPatch) -> CliContext:
    monkeypatch.setenv("EMBERVM_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("EMBERVM_SECRET_ACCESS_KEY", SECRET)
    ctx.endpoint_url = "http://127.0.0.1:8700"
    return ctx


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Callable[[Handler], list[dict[str, Any]]]:
    """``serve(handler)``: httpx clients the module makes are answered by ``handler``;
    returns the keyword arguments each client was made with."""

    def install(handler: Handler) -> list[dict[str, Any]]:
        made: list[dict[str, Any]] = []
        real = httpx.Client

        def client(**kwargs: Any) -> httpx.Client:
            made.append(kwargs)
            kwargs.pop("verify")
            return real(transport=httpx.MockTransport(handler), **kwargs)

        monkeypatch.setattr(_signed.httpx, "Client", client)
        return made

    return install


def _zip(tmp_path: Path, size: int) -> Path:
    path = tmp_path / "context.zip"
    path.write_bytes(bytes(i % 251 for i in range(size)))
    return path


def _error(status: int, code: str | None, body: bytes) -> httpx.Response:
    headers = {"x-amzn-ErrorType": code} if code else {}
    return httpx.Response(status, headers=headers, content=body)


# -- upload ----------------------------------------------------------------------------------


def test_an_upload_sends_the_file_signed_with_its_sha256(
    signed_ctx: CliContext,
    serve: Callable[[Handler], list[dict[str, Any]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_signed, "UPLOAD_CHUNK", 1000)  # several chunks, the last one short
    path = _zip(tmp_path, 3500)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        _verify(request, streamed=True)
        return httpx.Response(200, json={"codeArtifactUri": "file:///d/uploads/x.zip"})

    serve(handler)
    assert _signed.upload(signed_ctx, path) == "file:///d/uploads/x.zip"
    (request,) = seen
    assert (request.method, request.url.path) == ("PUT", "/embervm/v1/uploads")
    assert request.content == path.read_bytes()
    assert request.headers["x-amz-content-sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert request.headers["content-length"] == "3500"
    assert "transfer-encoding" not in request.headers


def test_an_upload_signed_with_another_secret_is_refused_by_the_verifier(
    signed_ctx: CliContext,
    serve: Callable[[Handler], list[dict[str, Any]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The check above can fail: a wrong secret does not pass the server's verification.
    monkeypatch.setenv("EMBERVM_SECRET_ACCESS_KEY", "another")
    refusals: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        try:
            _verify(request, streamed=True)
        except Exception as exc:
            refusals.append(type(exc).__name__)
            return _error(403, "AccessDeniedException", b'{"message": "bad signature"}')
        return httpx.Response(200, json={"codeArtifactUri": "file:///x"})

    serve(handler)
    with pytest.raises(CliError, match="AccessDeniedException: bad signature"):
        _signed.upload(signed_ctx, _zip(tmp_path, 10))
    assert refusals == ["AccessDeniedError"]


@pytest.mark.parametrize(
    ("response", "message", "exit_code"),
    [
        (
            _error(400, "ValidationException:http://internal.amazon.com/", b'{"message": "big"}'),
            "ValidationException: big",
            EXIT_INVALID,
        ),
        (_error(502, None, b"<html>bad gateway</html>"), "the server answered 502", EXIT_FAILED),
        (_error(500, "InternalError", b"not json"), "InternalError: not json", EXIT_FAILED),
        (
            _error(400, "ValidationException", b'["a list"]'),
            'ValidationException: ["a list"]',
            EXIT_INVALID,
        ),
    ],
)
def test_upload_failures_carry_the_model_error(
    signed_ctx: CliContext,
    serve: Callable[[Handler], list[dict[str, Any]]],
    tmp_path: Path,
    response: httpx.Response,
    message: str,
    exit_code: int,
) -> None:
    serve(lambda _request: response)
    with pytest.raises(CliError) as raised:
        _signed.upload(signed_ctx, _zip(tmp_path, 10))
    assert raised.value.message.startswith(message)
    assert raised.value.exit_code == exit_code


def test_an_error_body_is_read_only_up_to_its_cap(
    signed_ctx: CliContext, serve: Callable[[Handler], list[dict[str, Any]]], tmp_path: Path
) -> None:
    huge = b"x" * (10 * _signed.MAX_ERROR_BODY)
    serve(lambda _request: _error(500, None, huge))
    with pytest.raises(CliError) as raised:
        _signed.upload(signed_ctx, _zip(tmp_path, 10))
    assert raised.value.message == "the server answered 500: " + "x" * 200


@pytest.mark.parametrize("answer", [b"not json", b"[]", b'{"other": 1}'])
def test_an_answer_without_a_uri_is_not_understood(
    signed_ctx: CliContext,
    serve: Callable[[Handler], list[dict[str, Any]]],
    tmp_path: Path,
    answer: bytes,
) -> None:
    serve(lambda _request: httpx.Response(200, content=answer))
    with pytest.raises(CliError, match="not understood") as raised:
        _signed.upload(signed_ctx, _zip(tmp_path, 10))
    assert raised.value.exit_code == EXIT_FAILED


def test_an_upload_nobody_answers_is_unreachable(
    signed_ctx: CliContext, serve: Callable[[Handler], list[dict[str, Any]]], tmp_path: Path
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    serve(handler)
    with pytest.raises(CliError) as raised:
        _signed.upload(signed_ctx, _zip(tmp_path, 10))
    assert raised.value.exit_code == EXIT_UNREACHABLE
    assert "http://127.0.0.1:8700" in raised.value.message


# -- stream_lines ----------------------------------------------------------------------------


class _Breaking(httpx.SyncByteStream):
    """A body that sends ``head`` and then the connection breaks."""

    def __init__(self, head: bytes) -> None:
        self.head = head

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        raise httpx.ReadError("connection reset")


@pytest.mark.parametrize("follow", [False, True])
def test_log_lines_are_read_with_a_signed_get(
    signed_ctx: CliContext, serve: Callable[[Handler], list[dict[str, Any]]], follow: bool
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        _verify(request, streamed=False)
        return httpx.Response(200, content=b'{"message": "one"}\ntwo\n\nlast')

    made = serve(handler)
    lines = list(_signed.stream_lines(signed_ctx, "/embervm/v1/microvms/vm/logs", follow=follow))
    assert lines == ['{"message": "one"}', "two", "", "last"]
    (request,) = seen
    assert request.method == "GET"
    assert request.url.path == "/embervm/v1/microvms/vm/logs"
    assert request.url.query == (b"follow=true" if follow else b"")
    # A follower waits as long as the VM lives; a dump does not wait forever.
    assert made[0]["timeout"].read == (None if follow else 30.0)


def test_a_log_that_is_not_there_is_exit_4_before_any_line(
    signed_ctx: CliContext, serve: Callable[[Handler], list[dict[str, Any]]]
) -> None:
    body = json.dumps({"message": "no MicroVM vm-1"}).encode()
    serve(lambda _request: _error(404, "ResourceNotFoundException", body))
    lines = _signed.stream_lines(signed_ctx, "/p", follow=False)
    with pytest.raises(CliError) as raised:
        next(lines)
    assert raised.value.exit_code == EXIT_NOT_FOUND
    assert raised.value.message == "ResourceNotFoundException: no MicroVM vm-1"


def test_a_log_stream_nobody_answers_is_unreachable(
    signed_ctx: CliContext, serve: Callable[[Handler], list[dict[str, Any]]]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    serve(handler)
    with pytest.raises(CliError) as raised:
        list(_signed.stream_lines(signed_ctx, "/p", follow=True))
    assert raised.value.exit_code == EXIT_UNREACHABLE


def test_a_log_stream_that_breaks_after_it_started_is_a_failure_not_unreachable(
    signed_ctx: CliContext, serve: Callable[[Handler], list[dict[str, Any]]]
) -> None:
    serve(lambda _request: httpx.Response(200, stream=_Breaking(b"first\nsecond\n")))
    lines = _signed.stream_lines(signed_ctx, "/p", follow=True)
    assert [next(lines), next(lines)] == ["first", "second"]
    with pytest.raises(CliError) as raised:
        next(lines)
    assert raised.value.exit_code == EXIT_FAILED
    assert raised.value.message.startswith("the log stream broke:")
