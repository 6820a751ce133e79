"""``embervm fleet hosts|drain``: a fleet's hosts as the store sees them (docs/FLEET.md).

Both read and write PostgreSQL directly (``--database-url``, as the roles do): they work while
every API process is down, which is when an operator needs them most.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer

from embervm.cli._context import EXIT_NOT_FOUND, EXIT_USAGE, CliError
from embervm.cli._errors import handle_errors
from embervm.cli._output import OutputFormat, OutputOption, console, emit, table
from embervm.store import (
    ACTIVE_MICROVM_STATES,
    MEMORY_HOLDING_STATES,
    HostRecord,
    SqlRepository,
    open_repository,
)

app = typer.Typer(
    name="fleet",
    help="A fleet's hosts (docs/FLEET.md): list them, drain one.",
    no_args_is_help=True,
)

T = TypeVar("T")

DatabaseOption = Annotated[
    str | None,
    typer.Option(
        envvar="EMBERVM_DATABASE_URL",
        help="The fleet's PostgreSQL (postgresql+asyncpg://…), as its roles were given.",
    ),
]


def _with_store(url: str | None, work: Callable[[SqlRepository], Awaitable[T]]) -> T:
    if not url or not url.startswith("postgresql"):
        raise CliError("a fleet lives in PostgreSQL: give --database-url postgresql+asyncpg://…",
                       EXIT_USAGE)  # fmt: skip

    async def run() -> T:
        repository = await open_repository(url)
        try:
            return await work(repository)
        finally:
            await repository.close()

    return asyncio.run(run())


async def _describe(repository: SqlRepository, host: HostRecord) -> dict[str, Any]:
    placed = await repository.microvms_in_states(ACTIVE_MICROVM_STATES, host_id=host.host_id)
    holding = [vm for vm in placed if vm.state in MEMORY_HOLDING_STATES]
    return {
        "hostId": host.host_id,
        "state": host.state,
        "pid": host.pid,
        "address": host.address,
        "epoch": host.epoch,
        "memoryMiB": {
            "total": host.memory_total_mib,
            "reserved": sum(vm.memory_mib for vm in holding),
        },
        "microvms": [vm.microvm_id for vm in holding],
    }


@app.command("hosts")
@handle_errors
def hosts(database_url: DatabaseOption = None, output: OutputOption = OutputFormat.text) -> None:
    """Every host: state (ACTIVE, DRAINING, LOST), pid, address, memory, the VMs it runs."""

    async def read(repository: SqlRepository) -> list[dict[str, Any]]:
        return [await _describe(repository, h) for h in await repository.list_hosts()]

    rows = _with_store(database_url, read)
    emit(
        rows,
        output,
        lambda: table(
            ["HOST", "STATE", "PID", "ADDRESS", "MEMORY MiB (reserved/total)", "MICROVMS"],
            [
                [
                    r["hostId"],
                    r["state"],
                    r["pid"],
                    r["address"],
                    f"{r['memoryMiB']['reserved']}/{r['memoryMiB']['total']}",
                    len(r["microvms"]),
                ]
                for r in rows
            ],
        ),
    )


@app.command("drain")
@handle_errors
def drain(
    host_id: Annotated[str, typer.Argument(help="The host to drain.")],
    database_url: DatabaseOption = None,
    output: OutputOption = OutputFormat.text,
) -> None:
    """No new VM is placed on HOST; its suspended VMs resume elsewhere."""

    async def change(repository: SqlRepository) -> dict[str, Any] | None:
        drained = await repository.drain(host_id)
        return None if drained is None else await _describe(repository, drained)

    row = _with_store(database_url, change)
    if row is None:
        raise CliError(f"no host {host_id!r} in this fleet", EXIT_NOT_FOUND)
    emit(
        row,
        output,
        lambda: console.print(f"{row['hostId']}: {row['state']}", markup=False),
    )
