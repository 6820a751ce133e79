"""Fixtures of the api unit tests (defined in ``api_unit_harness``)."""

from api_unit_harness import api

__all__ = ["api"]
