"""The model's string patterns, matched with RE2: every one compiles, and RE2 answers what the
``regex`` package (the engine used before, with a 0.1 s timeout) answered.

The old engine is the oracle: values generated from each pattern (valid ones) and the same
values broken by characters that mean something to a pattern (whitespace of every kind,
Unicode digits, lone surrogates, ``:``/``*``) must get the same answer from both. The only
disagreements allowed are characters the two engines' Unicode tables disagree on (RE2 has
Unicode 15.1, ``regex`` a newer version): letters and digits assigned since.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embervm.model import _validate, pattern_matches, service_model
from embervm.model._validate import PatternError, _compiled, _re2_pattern


def _model_patterns() -> list[str]:
    model = service_model()
    found = {model.shape_for(name).metadata.get("pattern") for name in model.shape_names}
    return sorted(pattern for pattern in found if pattern is not None)


MODEL_PATTERNS = _model_patterns()
TAG_PATTERN = r"([\p{L}\p{Z}\p{N}_.:/=+\-@]*)"
# Patterns Python's ``re`` (behind ``st.from_regex``) cannot parse, with a strategy of their own.
HAND_STRATEGIES: dict[str, st.SearchStrategy[str]] = {
    TAG_PATTERN: st.text(
        st.characters(categories=("L", "Z", "N"), include_characters="_.:/=+-@"), max_size=40
    ),
}
# Characters that mean something to one of the patterns, or to one engine and not the other.
TRICKY = [
    *" \t\n\x0b\x0c\r\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u200a\u2028\u2029\u202f\u205f\u3000",
    *"\u200b\ufeff\x00\x7f",  # not White_Space, though they look like it
    *"0\u0663\u06f3\u0967\uff13\U0001d7d9",  # ASCII and Unicode digits (\d)
    *"\u00b2\u2167",  # numbers that are not digits (\p{N}, not \d)
    *":*/@=+_.-#$ ;!é\u00df\u4e2d",
    "\ud800",
    "\udfff",  # lone surrogates: valid JSON string escapes
]
BROKEN_BY_HAND = ["", " ", "a b", "tab\there", "semi;colon", "!!", "a\nb", "*:*", "a\ud800"]
FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _old_answer(pattern: str, value: str) -> bool:
    return regex.fullmatch(pattern, value) is not None


@functools.cache
def _every_character() -> str:
    """Every code point but the surrogates (which a ``str`` for RE2 cannot hold), in order."""
    return "".join(chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF)


def _runs(pattern: str, text: str, engine: str) -> list[tuple[int, int]]:
    """Spans of the maximal runs of characters ``pattern`` matches (few, even for [^...])."""
    run = f"(?:{pattern})+"
    if engine == "re2":
        return [m.span() for m in _compiled(run).finditer(text)]
    return [m.span() for m in regex.finditer(run, text)]


@functools.cache
def _table_disagreements() -> frozenset[str]:
    """Characters whose Unicode properties RE2's tables and the ``regex`` package's disagree on.

    RE2 must know no property ``regex`` does not (its tables are only older).
    """
    everything = _every_character()
    out: set[str] = set()
    for prop in (r"\p{L}", r"\p{N}", r"\p{Nd}", r"\p{Z}"):
        new = {i for a, b in _runs(prop, everything, "re2") for i in range(a, b)}
        old = {i for a, b in _runs(prop, everything, "regex") for i in range(a, b)}
        assert new <= old, f"RE2 says {prop} where regex does not"
        out.update(everything[i] for i in old - new)
    return frozenset(out)


def _comparable(value: str) -> bool:
    disagree = _table_disagreements()
    return not any(char in disagree for char in value)


def _valid_values(pattern: str) -> st.SearchStrategy[str]:
    if pattern in HAND_STRATEGIES:
        return HAND_STRATEGIES[pattern]
    return st.from_regex(pattern, fullmatch=True)


@pytest.mark.parametrize("pattern", MODEL_PATTERNS)
def test_every_model_pattern_compiles_in_re2(pattern: str) -> None:
    # A botocore bump whose model brings a pattern RE2 cannot match alike fails here.
    assert _compiled(pattern) is not None


@pytest.mark.parametrize("pattern", MODEL_PATTERNS)
def test_every_model_pattern_has_a_value_strategy(pattern: str) -> None:
    # A new pattern Python's re cannot parse needs an entry in HAND_STRATEGIES.
    if pattern not in HAND_STRATEGIES:
        re.compile(pattern)


def test_the_model_has_the_nine_patterns_checked_here() -> None:
    assert len(MODEL_PATTERNS) == 9
    assert TAG_PATTERN in MODEL_PATTERNS


@pytest.mark.parametrize("pattern", MODEL_PATTERNS)
@FUZZ
@given(data=st.data())
def test_values_generated_from_a_pattern_are_answered_as_before(
    pattern: str, data: st.DataObject
) -> None:
    value = data.draw(_valid_values(pattern).filter(_comparable), label="valid")
    assert pattern_matches(pattern, value) is True
    assert _old_answer(pattern, value) is True


@pytest.mark.parametrize("pattern", MODEL_PATTERNS)
@FUZZ
@given(data=st.data())
def test_broken_values_are_answered_as_before(pattern: str, data: st.DataObject) -> None:
    value = data.draw(_valid_values(pattern).filter(_comparable), label="valid")
    chars = st.sampled_from(TRICKY) | st.characters(codec=None)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        at = data.draw(st.integers(0, len(value)), label="at")
        cut = data.draw(st.integers(0, 1), label="replace")
        value = value[:at] + data.draw(chars, label="char") + value[at + cut :]
    if _comparable(value):
        assert pattern_matches(pattern, value) == _old_answer(pattern, value), repr(value)


@pytest.mark.parametrize("pattern", MODEL_PATTERNS)
@pytest.mark.parametrize("value", [*BROKEN_BY_HAND, *TRICKY, *(f"a{c}b" for c in TRICKY)])
def test_hand_picked_values_are_answered_as_before(pattern: str, value: str) -> None:
    assert pattern_matches(pattern, value) == _old_answer(pattern, value)


@pytest.mark.parametrize(
    "pattern", [r"\s", r"\S", r"\d", r"\D", r"[^\s]", r"[^\d]", r"[\d:]", r"[\s\d]"]
)
def test_class_escapes_mean_what_they_meant_to_regex_for_every_code_point(pattern: str) -> None:
    # RE2's own \s and \d are ASCII; _re2_pattern spells the Unicode meaning out.
    for code in range(0xD800, 0xE000):
        assert pattern_matches(pattern, chr(code)) == _old_answer(pattern, chr(code))
    disagree = _table_disagreements()
    everything = "".join(c for c in _every_character() if c not in disagree)
    assert _runs(pattern, everything, "re2") == _runs(pattern, everything, "regex")


def test_unicode_tables_disagree_only_on_characters_assigned_after_re2s() -> None:
    # RE2 15.1 against regex's newer tables: letters and digits of new scripts, nothing older.
    import unicodedata

    disagree = _table_disagreements()
    if unicodedata.unidata_version.split(".") <= ["15", "1", "0"]:
        assert all(unicodedata.category(c) == "Cn" for c in disagree)
    assert "\u0660" not in disagree  # Arabic-Indic zero, a digit in both


def test_long_valid_values_are_accepted_without_a_timeout() -> None:
    # The old engine gave up after 0.1 s and refused the value; RE2 always answers.
    assert "timeout" not in inspect.signature(pattern_matches).parameters
    assert not hasattr(_validate, "_PATTERN_TIMEOUT")
    assert not hasattr(_validate, "regex")
    assert pattern_matches(r"[^\s]+", "x" * 100_000)
    assert pattern_matches(TAG_PATTERN, "é" * 100_000)
    assert not pattern_matches(TAG_PATTERN, "a" * 100_000 + ";")
    arn = "arn:aws:lambda:us-east-1:123456789012:microvm-image:" + "a" * 100_000
    assert pattern_matches("arn:[a-z0-9-]+:lambda:[a-z0-9-]*:[a-z0-9]*:microvm-image:.+", arn)


def test_a_class_first_bracket_is_a_literal_as_before() -> None:
    for pattern in (r"[]a]+", r"[^]a]+"):
        for value in ("]", "a]", "b", "]b"):
            assert pattern_matches(pattern, value) == _old_answer(pattern, value)


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"\w+", r"\\w means something else"),
        (r"[\S]", r"\\S means something else"),
        (r"[[:alpha:]]", "POSIX"),
        (r"(?i)abc", "inline flags"),
        (r"(?=a)a", "lookarounds"),
        (r"a{,3}", "literal in RE2"),
        (r"(a)\1", "RE2 cannot compile"),
    ],
)
def test_a_pattern_re2_cannot_match_alike_fails_loudly(pattern: str, why: str) -> None:
    with pytest.raises(PatternError, match=why):
        pattern_matches(pattern, "a")


def test_translation_leaves_the_model_patterns_without_class_escapes_unchanged() -> None:
    for pattern in MODEL_PATTERNS:
        if r"\s" not in pattern and r"\d" not in pattern:
            assert _re2_pattern(pattern) == pattern
