"""Fixtures of the api integration tests (defined in ``api_live_server``)."""

from tests.framework.api_live_server import live_api

__all__ = ["live_api"]
