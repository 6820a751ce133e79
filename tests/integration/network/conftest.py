"""Fixtures of the network integration tests (defined in ``network_netns_world``)."""

from tests.framework.network_netns_world import world

__all__ = ["world"]
