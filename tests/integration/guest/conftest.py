"""Fixtures of the guest integration tests (the helpers live in ``guest_vm_helpers``)."""

from tests.framework.guest_vm_helpers import booted_vm

__all__ = ["booted_vm"]
