"""LocalPostgres against Debian's real PostgreSQL: start, connect, ``restart -m immediate``
(nothing committed is lost), stop (the postmaster is gone), idempotence, 127.0.0.1 only."""

from __future__ import annotations

import os
import pwd

import asyncpg
import pytest

from embervm.errors import ConfigError, RuntimeFailure
from embervm.localfleet import LocalPostgres, free_port, free_ports
from embervm.localfleet._proc import is_gone

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def dsn(pg: LocalPostgres) -> str:
    return pg.url.replace("postgresql+asyncpg://", "postgresql://")


async def query(pg: LocalPostgres, sql: str) -> object:
    conn = await asyncpg.connect(dsn(pg), timeout=10)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def execute(pg: LocalPostgres, sql: str) -> None:
    conn = await asyncpg.connect(dsn(pg), timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def test_start_connect_restart_immediately_connect_again_and_stop(
    postgres: LocalPostgres,
) -> None:
    port = free_port()
    postgres.start(port)
    assert postgres.url == f"postgresql+asyncpg://embervm@127.0.0.1:{port}/embervm"
    assert await query(postgres, "select 1") == 1
    assert await query(postgres, "select current_user || '/' || current_database()") == (
        "embervm/embervm"
    )
    await execute(postgres, "create table kept (n int); insert into kept values (42)")
    first = postgres.pid
    assert first is not None

    postgres.restart(mode="immediate")  # a crash and recovery, as `pg_ctl restart -m immediate`
    second = postgres.pid
    assert second is not None
    assert second != first
    assert is_gone(first)
    assert await query(postgres, "select n from kept") == 42  # committed before the crash

    postgres.stop()
    assert postgres.pid is None
    assert is_gone(second)
    with pytest.raises((OSError, asyncpg.PostgresError)):
        await asyncpg.connect(dsn(postgres), timeout=5)


async def test_start_and_stop_are_idempotent_and_a_second_port_is_refused(
    postgres: LocalPostgres,
) -> None:
    postgres.stop()  # not running: nothing to do
    with pytest.raises(RuntimeFailure, match="not running"):
        postgres.restart()
    port, other = free_ports(2)
    postgres.start(port)
    pid = postgres.pid
    postgres.start(port)  # running on that port: nothing to do
    assert postgres.pid == pid
    with pytest.raises(ConfigError, match=f"already runs on port {port}"):
        postgres.start(other)
    postgres.init()  # set up already: nothing to do
    assert await query(postgres, "select 1") == 1
    postgres.stop()
    postgres.stop()
    assert postgres.pid is None
    # Started again (another port), the cluster kept its data and its database.
    postgres.start(other)
    assert await query(postgres, "select count(*) from pg_database where datname = 'embervm'") == 1


def test_it_listens_on_127_0_0_1_only_and_belongs_to_the_postgres_user(
    postgres: LocalPostgres,
) -> None:
    port = free_port()
    postgres.start(port)
    listeners = tcp_listeners(port)
    assert listeners == {"0100007F"}, listeners  # 127.0.0.1 (little-endian hex), no ::1, no *
    hba = (postgres.data / "pg_hba.conf").read_text().split("\n")
    assert [line for line in hba if line and not line.startswith("#")] == [
        "local all all trust", "host all all 127.0.0.1/32 trust",
    ]  # fmt: skip
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres").pw_uid
        for path in (
            postgres.root,
            postgres.data,
            postgres.data / "pg_hba.conf",
            postgres.log_file,
        ):
            assert path.stat().st_uid == owner, path
        assert (postgres.root.stat().st_mode & 0o777) == 0o700


def tcp_listeners(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} writes them) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                address, hex_port = fields[1].split(":")
                if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found
