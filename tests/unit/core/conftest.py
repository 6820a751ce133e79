"""Fixtures of core's unit tests (defined in ``core_unit_harness``)."""

from tests.framework.core_unit_harness import rig

__all__ = ["rig"]
