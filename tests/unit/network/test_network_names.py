"""Names derived from VM ids fit the kernel's limits and are stable."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embervm.errors import ConfigError, NetworkSetupError
from embervm.network._names import (
    IFNAMSIZ,
    VmNames,
    check_tag,
    resolver_link,
    short_id,
    table_name,
)


@given(
    vm_id=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,199}", fullmatch=True),
    tag=st.from_regex(r"[a-z][a-z0-9]{0,3}", fullmatch=True),
)
def test_interface_names_fit_ifnamsiz_for_any_vm_id(vm_id: str, tag: str) -> None:
    names = VmNames.derive(vm_id, tag)
    for name in (names.host_link, names.netns_link, names.tap, resolver_link(tag)):
        assert len(name) <= IFNAMSIZ
        assert name.isascii()
        assert "/" not in name
        assert " " not in name


def test_names_are_stable_and_distinct_per_vm() -> None:
    a1, a2, b = VmNames.derive("mvm-a"), VmNames.derive("mvm-a"), VmNames.derive("mvm-b")
    assert a1 == a2
    assert a1.short != b.short
    assert a1.netns == f"emb-{a1.short}"
    assert a1.host_link == f"ev{a1.short}"
    assert a1.tap == "tap0"


def test_tag_separates_namespace_names_and_table() -> None:
    assert VmNames.derive("x", "t1").netns.startswith("t1-")
    assert table_name("emb") == "embervm"
    assert table_name("t1") == "embervm_t1"


def test_short_id_is_ten_hex_digits() -> None:
    sid = short_id("arn:aws:lambda:us-east-1:000000000000:microvm:mvm-123")
    assert len(sid) == 10
    int(sid, 16)


@pytest.mark.parametrize("tag", ["", "EMB", "toolong", "1ab", "a-b"])
def test_bad_tags_are_refused(tag: str) -> None:
    with pytest.raises(ConfigError):
        check_tag(tag)


@pytest.mark.parametrize("vm_id", ["", "a b", 'a"b', "a\nlink del eth0", "-x", "x" * 201])
def test_vm_ids_that_could_break_a_batch_line_are_refused(vm_id: str) -> None:
    with pytest.raises(NetworkSetupError):
        VmNames.derive(vm_id)


def test_arns_are_accepted() -> None:
    arn = "arn:aws:lambda:us-east-1:000000000000:microvm/mvm-0123456789abcdef"
    assert VmNames.derive(arn).alias.endswith(arn)
