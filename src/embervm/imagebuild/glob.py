"""Glob patterns matched in linear time, for COPY/ADD sources and ``.dockerignore`` lines.

Patterns come from image authors, so they are hostile: a regex translation of ``*a*a*a…b``
backtracks exponentially, and CPython's ``re`` holds the GIL for the whole match, which froze the
event loop even from a worker thread (audit A3). Here a pattern compiles to a small NFA that is
simulated state set by state set: the cost of a match is at most ``len(pattern) * len(path)``
steps, in pure Python (so a worker thread running it yields the GIL like any other Python code).

Syntax (Go's ``filepath.Match``, plus ``**`` for ``.dockerignore``): ``*`` any run of characters
other than ``/``, ``?`` one such character, ``[...]`` a class (``^`` or ``!`` negates, ``a-z``
ranges, ``\\`` escapes; never ``/``), ``\\x`` a literal ``x``; with ``globstar``, ``**`` any number
of whole segments (``**/`` also none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

#: Longest pattern accepted; longer ones are refused rather than compiled.
MAX_PATTERN = 4096

_Pred = Callable[[str], bool]


class GlobError(ValueError):
    """The pattern is malformed (the caller words the message for its user)."""


@dataclass
class _Node:
    edges: list[tuple[_Pred, int]] = field(default_factory=list)
    eps: list[int] = field(default_factory=list)


def _not_slash(ch: str) -> bool:
    return ch != "/"


def _anything(ch: str) -> bool:
    return True


def _is_slash(ch: str) -> bool:
    return ch == "/"


def _literal(c: str) -> _Pred:
    return c.__eq__


def _class(body: str) -> _Pred:
    negate = body[:1] in ("^", "!")
    if negate:
        body = body[1:]
    singles: set[str] = set()
    ranges: list[tuple[str, str]] = []
    chars: list[tuple[str, bool]] = []  # (character, escaped)
    i = 0
    while i < len(body):
        escaped = body[i] == "\\" and i + 1 < len(body)
        i += escaped
        chars.append((body[i], escaped))
        i += 1
    j = 0
    while j < len(chars):
        if j + 2 < len(chars) and chars[j + 1] == ("-", False):
            lo, hi = chars[j][0], chars[j + 2][0]
            if lo > hi:
                raise GlobError(f"bad range {lo}-{hi}")
            ranges.append((lo, hi))
            j += 3
        else:
            singles.add(chars[j][0])
            j += 1

    def member(ch: str) -> bool:
        if ch == "/":
            return False
        inside = ch in singles or any(lo <= ch <= hi for lo, hi in ranges)
        return inside != negate

    return member


class Glob:
    """One compiled pattern; ``match`` tells whether a whole path matches it."""

    def __init__(self, pattern: str, *, globstar: bool = False) -> None:
        if len(pattern) > MAX_PATTERN:
            raise GlobError(f"longer than {MAX_PATTERN} characters")
        self.pattern = pattern
        self._nodes: list[_Node] = [_Node()]
        self._compile(pattern, globstar)

    def _new(self) -> int:
        self._nodes.append(_Node())
        return len(self._nodes) - 1

    def _step(self, pred: _Pred) -> None:
        here = len(self._nodes) - 1
        self._nodes[here].edges.append((pred, self._new()))

    def _compile(self, p: str, globstar: bool) -> None:
        i, n = 0, len(p)
        while i < n:
            ch = p[i]
            here = len(self._nodes) - 1
            if ch == "*" and globstar and p.startswith("**", i):
                i += 2
                if i < n and p[i] == "/":
                    i += 1
                    # (.*/)? : skip it all, or any characters ending with a slash.
                    loop, out = self._new(), self._new()
                    self._nodes[here].eps += [loop, out]
                    self._nodes[loop].edges += [(_anything, loop), (_is_slash, out)]
                else:
                    self._nodes[here].edges.append((_anything, here))
                continue
            if ch == "*":
                self._nodes[here].edges.append((_not_slash, here))
                self._nodes[here].eps.append(self._new())
            elif ch == "?":
                self._step(_not_slash)
            elif ch == "[":
                end = p.find("]", i + 1)
                if end < 0:
                    raise GlobError("unclosed '['")
                self._step(_class(p[i + 1 : end]))
                i = end
            elif ch == "\\" and i + 1 < n:
                i += 1
                self._step(_literal(p[i]))
            else:
                self._step(_literal(ch))
            i += 1

    def _closure(self, states: set[int]) -> set[int]:
        todo = list(states)
        while todo:
            for nxt in self._nodes[todo.pop()].eps:
                if nxt not in states:
                    states.add(nxt)
                    todo.append(nxt)
        return states

    def match(self, path: str) -> bool:
        final = len(self._nodes) - 1
        states = self._closure({0})
        for ch in path:
            step = {nxt for s in states for pred, nxt in self._nodes[s].edges if pred(ch)}
            if not step:
                return False
            states = self._closure(step)
        return final in states
