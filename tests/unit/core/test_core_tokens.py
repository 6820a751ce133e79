"""Endpoint and shell tokens: what they grant, and every way to misuse one."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from embervm.contracts import PortGrant
from embervm.core.tokens import TokenAuthority, TokenRejected

VM = "mvm-0123456789abcdef0123"
OTHER = "mvm-fedcba9876543210fedc"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def authority(tmp_path: Path, clock: Clock) -> TokenAuthority:
    return TokenAuthority(tmp_path / "keys" / "tokens.json", clock=clock)


def test_round_trip_grants_exactly_what_was_issued(authority: TokenAuthority) -> None:
    ports = PortGrant(ranges=((8080, 8080), (9000, 9010)))
    token = authority.issue(VM, kind="endpoint", ports=ports, expires_in_minutes=5)
    claims = authority.verify(token, microvm_id=VM, port=9005, kind="endpoint")
    assert claims.microvm_id == VM
    assert claims.ports == ports
    for port in (8081, 9011, 1):
        with pytest.raises(TokenRejected):
            authority.verify(token, microvm_id=VM, port=port, kind="endpoint")


def test_wrong_vm_and_wrong_kind_are_rejected(authority: TokenAuthority) -> None:
    token = authority.issue(VM, kind="endpoint", ports=PortGrant(all_ports=True),
                            expires_in_minutes=5)  # fmt: skip
    with pytest.raises(TokenRejected, match="another"):
        authority.verify(token, microvm_id=OTHER, port=8080, kind="endpoint")
    with pytest.raises(TokenRejected, match="shell"):
        authority.verify(token, microvm_id=VM, port=8022, kind="shell")


def test_expiry_is_capped_at_an_hour_and_enforced(authority: TokenAuthority, clock: Clock) -> None:
    token = authority.issue(VM, kind="shell", ports=PortGrant(all_ports=True),
                            expires_in_minutes=600)  # fmt: skip
    clock.now += 59 * 60
    authority.verify(token, microvm_id=VM, port=8022, kind="shell")
    clock.now += 61
    with pytest.raises(TokenRejected, match="expired"):
        authority.verify(token, microvm_id=VM, port=8022, kind="shell")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # tag
        lambda t: ".".join(p if i != 3 else p[::-1] for i, p in enumerate(t.split("."))),
        lambda t: "",
        lambda t: "x" * 5000,
        lambda t: "a.b.c.d.e",
        lambda t: t + ".",
    ],
    ids=["tag", "ciphertext", "empty", "huge", "garbage", "extra-part"],
)
def test_tampered_or_forged_tokens_are_rejected(authority: TokenAuthority, mangle: object) -> None:
    token = authority.issue(VM, kind="endpoint", ports=PortGrant(all_ports=True),
                            expires_in_minutes=5)  # fmt: skip
    with pytest.raises(TokenRejected):
        authority.verify(mangle(token), microvm_id=VM, port=8080, kind="endpoint")  # type: ignore[operator]


def test_a_token_from_another_server_is_rejected(tmp_path: Path, clock: Clock) -> None:
    ours = TokenAuthority(tmp_path / "a.json", clock=clock)
    theirs = TokenAuthority(tmp_path / "b.json", clock=clock)
    token = theirs.issue(VM, kind="endpoint", ports=PortGrant(all_ports=True), expires_in_minutes=5)
    with pytest.raises(TokenRejected):
        ours.verify(token, microvm_id=VM, port=8080, kind="endpoint")


def test_header_algorithm_cannot_be_swapped(authority: TokenAuthority) -> None:
    token = authority.issue(VM, kind="endpoint", ports=PortGrant(all_ports=True),
                            expires_in_minutes=5)  # fmt: skip
    head = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    head["enc"] = "A128GCM"
    forged = base64.urlsafe_b64encode(json.dumps(head).encode()).decode().rstrip("=")
    with pytest.raises(TokenRejected):
        authority.verify(".".join([forged, *token.split(".")[1:]]), microvm_id=VM, port=8080,
                         kind="endpoint")  # fmt: skip


def test_rotation_keeps_old_tokens_valid_and_signs_with_the_new_key(
    authority: TokenAuthority, tmp_path: Path, clock: Clock
) -> None:
    old = authority.issue(VM, kind="endpoint", ports=PortGrant(all_ports=True),
                          expires_in_minutes=60)  # fmt: skip
    first_kid = json.loads(authority.keys_file.read_text())["current"]
    authority.rotate()
    new = authority.issue(VM, kind="endpoint", ports=PortGrant(all_ports=True),
                          expires_in_minutes=60)  # fmt: skip
    assert json.loads(base64.urlsafe_b64decode(new.split(".")[0] + "=="))["kid"] != first_kid
    other_process = TokenAuthority(authority.keys_file, clock=clock)
    for token in (old, new):
        other_process.verify(token, microvm_id=VM, port=8080, kind="endpoint")
    clock.now += 2 * 3600
    authority.rotate()  # the first key retired long ago: dropped
    kids = [k["kid"] for k in json.loads(authority.keys_file.read_text())["keys"]]
    assert first_kid not in kids


def test_key_file_is_private(authority: TokenAuthority) -> None:
    assert stat.S_IMODE(authority.keys_file.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "header",
    [b"[" * 3000, b"{" * 2000, b'"kid"', b"[]", b'{"kid": ["x"]}', b"\xff\xfe"],
)
def test_crafted_headers_are_refused_not_raised(authority: TokenAuthority, header: bytes) -> None:
    # A14: a nested header segment used to escape as RecursionError (a traceback per request).
    token = base64.urlsafe_b64encode(header).decode().rstrip("=") + ".a.b.c.d"
    with pytest.raises(TokenRejected):
        authority.claims(token)


def _endpoint_token(authority: TokenAuthority) -> str:
    return authority.issue(VM, kind="endpoint", ports=PortGrant(all_ports=True),
                           expires_in_minutes=60)  # fmt: skip


def test_revoking_rotation_refuses_cached_tokens_here_and_in_other_processes(
    authority: TokenAuthority, clock: Clock
) -> None:
    # A17: a verified token stayed cached (and valid) after its key was gone.
    token = _endpoint_token(authority)
    other_process = TokenAuthority(authority.keys_file, clock=clock)
    claims = other_process.verify(token, microvm_id=VM, port=8080, kind="endpoint")
    assert claims.key_id == json.loads(authority.keys_file.read_text())["current"]
    assert other_process.current(claims)
    authority.rotate(revoke=True)
    assert not other_process.current(claims)
    for verifier in (authority, other_process):
        with pytest.raises(TokenRejected):
            verifier.verify(token, microvm_id=VM, port=8080, kind="endpoint")
    fresh = _endpoint_token(authority)
    other_process.verify(fresh, microvm_id=VM, port=8080, kind="endpoint")


def test_a_deleted_key_file_is_noticed_and_replaced(authority: TokenAuthority) -> None:
    token = _endpoint_token(authority)
    claims = authority.verify(token, microvm_id=VM, port=8080, kind="endpoint")
    authority.keys_file.unlink()
    assert not authority.current(claims)
    with pytest.raises(TokenRejected):
        authority.verify(token, microvm_id=VM, port=8080, kind="endpoint")
    assert authority.keys_file.exists()
    authority.verify(_endpoint_token(authority), microvm_id=VM, port=8080, kind="endpoint")


def test_current_turns_false_at_expiry(authority: TokenAuthority, clock: Clock) -> None:
    claims = authority.claims(_endpoint_token(authority))
    clock.now += 59 * 60
    assert authority.current(claims)
    clock.now += 61
    assert not authority.current(claims)


def test_scheduled_rotation_happens_when_the_key_is_due_and_keeps_live_tokens(
    authority: TokenAuthority, clock: Clock
) -> None:
    token = _endpoint_token(authority)
    first = json.loads(authority.keys_file.read_text())["current"]
    clock.now += 23 * 3600
    assert not authority.rotate_if_due(24 * 3600)
    clock.now += 3600
    assert authority.rotate_if_due(24 * 3600)
    assert json.loads(authority.keys_file.read_text())["current"] != first
    assert not authority.rotate_if_due(24 * 3600)  # the new key is young
    clock.now = 1_800_000_000.0 + 30 * 60  # a token sealed by the retired key is still good
    authority.verify(token, microvm_id=VM, port=8080, kind="endpoint")


def test_rotations_by_two_processes_keep_both_keys(authority: TokenAuthority, clock: Clock) -> None:
    other_process = TokenAuthority(authority.keys_file, clock=clock)
    a = authority.rotate()
    b = other_process.rotate()  # read the file under the lock: a's key is kept
    kids = [k["kid"] for k in json.loads(authority.keys_file.read_text())["keys"]]
    assert a in kids
    assert b in kids


def test_key_file_write_fsyncs_the_directory(
    authority: TokenAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A22: the key file's rename was not made durable (no fsync of the directory).
    import embervm.fileio

    synced: list[Path] = []
    real = embervm.fileio.fsync_dir
    monkeypatch.setattr(embervm.fileio, "fsync_dir", lambda p: (synced.append(p), real(p)))
    authority.rotate()
    assert synced == [authority.keys_file.parent]
    assert stat.S_IMODE(authority.keys_file.stat().st_mode) == 0o600


def test_requests_verified_from_the_cache_look_at_the_key_file_at_most_once_a_second(
    authority: TokenAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stat of the key file on every request cost a fifth of the proxy's time per request.
    import embervm.core.tokens as tokens

    token = _endpoint_token(authority)
    authority.verify(token, microvm_id=VM, port=8080, kind="endpoint")
    looks: list[Path] = []
    real = tokens._file_stamp
    monkeypatch.setattr(tokens, "_file_stamp", lambda p: (looks.append(p), real(p))[1])
    for _ in range(1000):
        authority.verify(token, microvm_id=VM, port=8080, kind="endpoint")
    assert len(looks) <= 1
    claims = authority.claims(token)
    authority.current(claims)  # what open sessions call: always looks
    assert len(looks) <= 2
