"""``cli/_errors.py``: whatever a command raises becomes one ``error: ...`` line on stderr and
the exit code the README documents (1 failed, 3 unreachable, 4 not found, 5 conflict,
6 invalid input)."""

from __future__ import annotations

import pytest
import typer
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)

from embervm.cli._context import (
    EXIT_CONFLICT,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_NOT_FOUND,
    EXIT_UNREACHABLE,
    CliContext,
    CliError,
)
from embervm.cli._errors import api_error, handle_errors, translate, unreachable


def _client_error(code: str, message: str = "") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, "GetMicrovm")


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        ("ResourceNotFoundException", EXIT_NOT_FOUND),
        ("ConflictException", EXIT_CONFLICT),
        ("ValidationException", EXIT_INVALID),
        ("ServiceQuotaExceededException", EXIT_FAILED),
        ("AccessDeniedException", EXIT_FAILED),
    ],
)
def test_api_errors_map_to_their_exit_codes(code: str, exit_code: int) -> None:
    error = api_error(code, "the message")
    assert (error.message, error.exit_code) == (f"{code}: the message", exit_code)


def test_an_api_error_without_a_message_names_its_code() -> None:
    assert api_error("ConflictException", "").message == "ConflictException: ConflictException"


def test_unreachable_names_the_url_and_is_exit_3() -> None:
    error = unreachable("http://h:1")
    assert "http://h:1" in error.message
    assert "embervm server" in error.message
    assert error.exit_code == EXIT_UNREACHABLE


@pytest.mark.parametrize(
    "exc",
    [
        EndpointConnectionError(endpoint_url="http://x"),
        ConnectionClosedError(endpoint_url="http://x"),
    ],
)
def test_connection_errors_are_unreachable_at_the_given_endpoint(exc: Exception) -> None:
    error = translate(exc, "http://api.example:8700")
    assert error is not None
    assert error.exit_code == EXIT_UNREACHABLE
    assert "http://api.example:8700" in error.message


def test_a_read_timeout_is_exit_3_but_not_called_unreachable() -> None:
    error = translate(ReadTimeoutError(endpoint_url="http://x"), "http://e")
    assert error is not None
    assert error.exit_code == EXIT_UNREACHABLE
    assert error.message == "the Embervm server did not answer in time"


def test_botocores_own_validation_is_invalid_input_on_one_line() -> None:
    report = "Invalid type for parameter minutes,\n  value: x, type: <class 'str'>"
    error = translate(ParamValidationError(report=report))
    assert error is not None
    assert error.exit_code == EXIT_INVALID
    assert error.message == (
        "invalid input: Invalid type for parameter minutes, value: x, type: <class 'str'>"
    )


def test_no_credentials_is_exit_1_and_says_how_to_get_them() -> None:
    error = translate(NoCredentialsError())
    assert error is not None
    assert error.exit_code == EXIT_FAILED
    assert "--data-dir" in error.message


def test_a_client_error_carries_the_servers_code_and_message() -> None:
    error = translate(_client_error("ConflictException", "vm-1 is SUSPENDED"))
    assert error is not None
    assert (error.message, error.exit_code) == (
        "ConflictException: vm-1 is SUSPENDED",
        EXIT_CONFLICT,
    )


def test_a_client_error_without_an_error_body_is_a_failure() -> None:
    error = translate(ClientError({}, "GetMicrovm"))
    assert error is not None
    assert (error.message, error.exit_code) == ("Error: Error", EXIT_FAILED)


def test_a_cli_error_is_itself_and_anything_else_is_unknown() -> None:
    mine = CliError("x", 6)
    assert translate(mine) is mine
    assert translate(ValueError("x")) is None


# -- handle_errors ---------------------------------------------------------------------------


def _failing(exc: BaseException) -> typer.Exit:
    @handle_errors
    def command() -> None:
        raise exc

    with pytest.raises(typer.Exit) as raised:
        command()
    return raised.value


@pytest.mark.usefixtures("ctx")
def test_a_command_that_works_returns_its_value() -> None:
    assert handle_errors(lambda x: x + 1)(1) == 2


@pytest.mark.usefixtures("ctx")
def test_a_server_message_is_printed_on_one_line_without_its_markup_taking_effect(
    capsys: pytest.CaptureFixture[str],
) -> None:
    exit_ = _failing(_client_error("ValidationException", "bad [/] value\nsecond [b]line[/b]"))
    assert exit_.exit_code == EXIT_INVALID
    err = capsys.readouterr().err
    assert err == "error: ValidationException: bad [/] value second [b]line[/b]\n"


def test_unreachable_names_the_contexts_endpoint(
    ctx: CliContext, capsys: pytest.CaptureFixture[str]
) -> None:
    ctx.endpoint_url = "http://10.0.0.7:8700"
    exit_ = _failing(EndpointConnectionError(endpoint_url="http://x"))
    assert exit_.exit_code == EXIT_UNREACHABLE
    assert "http://10.0.0.7:8700" in capsys.readouterr().err


@pytest.mark.usefixtures("ctx")
def test_an_unknown_exception_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    exit_ = _failing(ValueError("boom\nmore"))
    assert exit_.exit_code == EXIT_FAILED
    assert capsys.readouterr().err == (
        "error: unexpected ValueError: boom more (EMBERVM_DEBUG=1 shows where)\n"
    )


@pytest.mark.usefixtures("ctx")
def test_embervm_debug_lets_an_unknown_exception_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBERVM_DEBUG", "1")

    @handle_errors
    def command() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        command()


@pytest.mark.usefixtures("ctx")
def test_embervm_debug_still_translates_known_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EMBERVM_DEBUG", "1")
    assert _failing(CliError("no such thing", EXIT_NOT_FOUND)).exit_code == EXIT_NOT_FOUND
    assert capsys.readouterr().err == "error: no such thing\n"


@pytest.mark.usefixtures("ctx")
def test_ctrl_c_is_exit_130(capsys: pytest.CaptureFixture[str]) -> None:
    assert _failing(KeyboardInterrupt()).exit_code == 130
    assert capsys.readouterr().err == "interrupted\n"


@pytest.mark.usefixtures("ctx")
def test_a_commands_own_exit_passes_through(capsys: pytest.CaptureFixture[str]) -> None:
    assert _failing(typer.Exit(7)).exit_code == 7
    assert capsys.readouterr().err == ""
