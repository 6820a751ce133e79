"""Fixtures of the proxy's unit tests (defined in ``proxy_unit_harness``)."""

from tests.framework.proxy_unit_harness import app, rig

__all__ = ["app", "rig"]
