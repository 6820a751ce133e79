"""Fixtures of the proxy's unit tests (defined in ``proxy_unit_harness``, ``proxy_h2_peers``)."""

from tests.framework.proxy_h2_peers import h2c_port
from tests.framework.proxy_unit_harness import app, rig

__all__ = ["app", "h2c_port", "rig"]
