"""The ``KeyRing`` seam of ``TokenAuthority`` with the file ring: a path and a ``FileKeyRing``
are the same keys, the async rotations (what a fleet's scheduled rotation calls) keep the file's
format and lock, and a loaded key set never shows its keys."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from embervm.contracts import PortGrant
from embervm.core.tokens import FileKeyRing, TokenAuthority

VM = "mvm-0123456789abcdef0123"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _seal(authority: TokenAuthority) -> str:
    return authority.issue(VM, kind="endpoint", ports=PortGrant(all_ports=True),
                           expires_in_minutes=60)  # fmt: skip


def test_a_path_and_a_file_ring_are_the_same_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "tokens.json"
    by_path = TokenAuthority(path)
    by_ring = TokenAuthority(FileKeyRing(path))
    assert by_ring.keys_file == path
    by_ring.verify(_seal(by_path), microvm_id=VM, port=8080, kind="endpoint")
    by_path.verify(_seal(by_ring), microvm_id=VM, port=8080, kind="endpoint")


async def test_async_rotations_write_the_file_under_its_lock(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "tokens.json"
    one, two = TokenAuthority(path, clock=clock), TokenAuthority(path, clock=clock)
    old = _seal(one)
    first = json.loads(path.read_text())["current"]
    a, b = await asyncio.gather(one.rotate_async(), two.rotate_async())
    body = json.loads(path.read_text())
    assert {k["kid"] for k in body["keys"]} == {first, a, b}
    assert body["current"] in {a, b}
    two.verify(old, microvm_id=VM, port=8080, kind="endpoint")
    assert not await one.rotate_if_due_async(3600)
    clock.now += 3600
    assert await one.rotate_if_due_async(3600)
    assert json.loads(path.read_text())["current"] not in {a, b}


def test_a_loaded_key_set_does_not_show_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    ring = FileKeyRing(path)
    secret = json.loads(path.read_text())["keys"][0]["secret"]
    shown = repr(ring.loaded)
    assert ring.loaded.current in shown
    assert secret not in shown
    assert "OctKey" not in shown
