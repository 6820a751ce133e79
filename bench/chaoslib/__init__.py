"""Chaos and soak scenarios, shared by ``bench/chaos.py`` (full size, a table) and
``tests/integration/chaos`` (the same code at a small size, as CI tests).

A scenario is a name and ``async run(size) -> Row``: it injects its faults, checks every
record it can after each one, and raises ``StateLost`` (an ``AssertionError``) at the first
record that is not what it must be. VM-level scenarios live in ``chaoslib.vm``; server-level
ones can join ``bench/chaos.py``'s list the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass


class StateLost(AssertionError):
    """A record a scenario checks (counter, file hash, PID, ...) was not what it must be."""


@dataclass(frozen=True)
class Row:
    """One scenario's result, as the bench's table prints it."""

    scenario: str
    cycles: int  # cycles the system survived (suspend/resume, fill/fail/recover, ...)
    faults: int  # faults injected
    records: int  # records checked after the faults (each one equal to what it must be)
    lost: int  # records found changed or missing (a scenario raises at the first one)
    note: str = ""  # what else was seen: snapshot kinds, timings (the bench's, not a test's)


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[int], Awaitable[Row]]
    full_size: int  # the bench's size; CI runs a few


__all__ = ["Row", "Scenario", "StateLost"]
