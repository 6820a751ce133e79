"""Fixtures of the api unit tests (defined in ``api_unit_harness``)."""

from tests.framework.api_unit_harness import api

__all__ = ["api"]
