"""``embervm tokens rotate [--revoke]`` on the key file a server shares (A17)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.framework.cli_harness import as_json, cli

from embervm.config import DataDir
from embervm.contracts import PortGrant
from embervm.core.tokens import TokenAuthority, TokenRejected

VM = "mvm-0123456789abcdef0123"


def _token(server_side: TokenAuthority) -> str:
    return server_side.issue(VM, kind="shell", ports=PortGrant(all_ports=True),
                             expires_in_minutes=60)  # fmt: skip


def test_rotate_keeps_issued_tokens_and_revoke_refuses_them(tmp_path: Path) -> None:
    server_side = TokenAuthority(DataDir(tmp_path).token_keys)
    token = _token(server_side)
    claims = server_side.verify(token, microvm_id=VM, port=22, kind="shell")

    rotated = as_json(cli(None, "tokens", "rotate", "-o", "json", data_dir=tmp_path))
    assert rotated["revoked"] is False
    assert server_side.verify(token, microvm_id=VM, port=22, kind="shell") == claims
    assert server_side.claims(_token(server_side)).key_id == rotated["keyId"]

    revoked = as_json(cli(None, "tokens", "rotate", "--revoke", "-o", "json", data_dir=tmp_path))
    assert revoked["revoked"] is True
    assert revoked["keyId"] != rotated["keyId"]
    assert not server_side.current(claims)
    with pytest.raises(TokenRejected):
        server_side.verify(token, microvm_id=VM, port=22, kind="shell")
