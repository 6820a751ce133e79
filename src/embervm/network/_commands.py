"""Running `ip`, `nft` and friends: the one place this package meets subprocesses.

Everything Linux-specific that the network code does goes through a ``CommandRunner``. The real
one runs the program with a timeout and turns a failure into ``NetworkSetupError`` carrying the
command and its stderr; unit tests substitute a fake that records commands
(``tests/framework/fake_network.py``).
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from embervm.errors import NetworkSetupError

DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True)
class CommandResult:
    """What a finished command returned."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class CommandRunner(Protocol):
    """Runs one program; the seam between the network logic and the host."""

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
        time_limit: float = DEFAULT_TIMEOUT,
    ) -> CommandResult:
        """Run ``argv``; with ``check`` a non-zero exit raises ``NetworkSetupError``."""
        ...


def describe(argv: Sequence[str]) -> str:
    """The command as a shell would spell it, for error messages."""
    return shlex.join(argv)


def failure(result: CommandResult) -> NetworkSetupError:
    """The error for a command that exited non-zero: command, exit code and stderr."""
    stderr = result.stderr.strip() or result.stdout.strip() or "(no output)"
    return NetworkSetupError(
        f"`{describe(result.argv)}` failed with exit code {result.returncode}: {stderr}"
    )


class SubprocessRunner:
    """The real ``CommandRunner``: asyncio subprocesses, bounded by a timeout, killed on expiry."""

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
        time_limit: float = DEFAULT_TIMEOUT,
    ) -> CommandResult:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise NetworkSetupError(f"`{describe(argv)}` could not be started: {exc}") from exc
        data = input.encode() if input is not None else None
        try:
            out, err = await asyncio.wait_for(proc.communicate(data), time_limit)
        except TimeoutError as exc:
            proc.kill()
            await proc.wait()
            raise NetworkSetupError(
                f"`{describe(argv)}` did not finish within {time_limit:g} s"
            ) from exc
        except asyncio.CancelledError:
            if proc.returncode is None:
                proc.kill()
                await asyncio.shield(proc.wait())
            raise
        result = CommandResult(
            tuple(argv),
            proc.returncode or 0,
            out.decode(errors="replace"),
            err.decode(errors="replace"),
        )
        if check and result.returncode != 0:
            raise failure(result)
        return result
