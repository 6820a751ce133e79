"""Turn whatever a command raised into one readable line and a meaningful exit code."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer
from rich.markup import escape

from embervm.cli._context import (
    EXIT_CONFLICT,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_NOT_FOUND,
    EXIT_UNREACHABLE,
    CliError,
)
from embervm.cli._output import err_console, one_line

P = ParamSpec("P")
R = TypeVar("R")

_EXIT_BY_CODE = {
    "ResourceNotFoundException": EXIT_NOT_FOUND,
    "ConflictException": EXIT_CONFLICT,
    "ValidationException": EXIT_INVALID,
}


def api_error(code: str, message: str) -> CliError:
    """The CliError for a model error (``x-amzn-ErrorType`` code and message)."""
    return CliError(f"{code}: {message or code}", _EXIT_BY_CODE.get(code, EXIT_FAILED))


def unreachable(where: str) -> CliError:
    """Nothing answered at ``where`` (the API's URL)."""
    return CliError(
        f"cannot reach the Embervm server at {where}: is `embervm server` running?",
        EXIT_UNREACHABLE,
    )


def translate(exc: BaseException, endpoint: str = "") -> CliError | None:
    """The CliError for a foreign exception, or None if it is not one we know."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
        NoCredentialsError,
        ParamValidationError,
        ReadTimeoutError,
    )

    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, EndpointConnectionError | ConnectionClosedError):
        return unreachable(endpoint or "the API")
    if isinstance(exc, ReadTimeoutError):
        return CliError("the Embervm server did not answer in time", EXIT_UNREACHABLE)
    if isinstance(exc, ParamValidationError):  # botocore's own checks, before any request
        report = " ".join(str(exc.kwargs.get("report", exc)).split())
        return CliError(f"invalid input: {report}", EXIT_INVALID)
    if isinstance(exc, NoCredentialsError):
        return CliError("no credentials: start the server once or pass --data-dir", EXIT_FAILED)
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return api_error(str(error.get("Code", "Error")), str(error.get("Message", "")))
    return None


def handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Decorate a command: errors become ``error: ...`` on stderr and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:
            from embervm.cli._app import current

            error = translate(exc, current().endpoint_url)
            if error is None:
                if os.environ.get("EMBERVM_DEBUG"):
                    raise
                error = CliError(
                    f"unexpected {type(exc).__name__}: {exc} (EMBERVM_DEBUG=1 shows where)",
                    EXIT_FAILED,
                )
            # One line: a message from the server may hold newlines or markup of its own.
            err_console.print(f"[red]error:[/red] {escape(one_line(error.message))}")
            raise typer.Exit(error.exit_code) from None

    return wrapper
