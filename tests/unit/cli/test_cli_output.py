"""``cli/_output.py``: JSON for scripts, text for people, and what the server sends (through it,
guests and builds) printed without markup or terminal control sequences taking effect."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from embervm.cli._output import (
    OutputFormat,
    emit,
    fields,
    one_line,
    safe_text,
    strip_metadata,
    table,
    to_json,
)


def test_safe_text_replaces_every_control_but_tab() -> None:
    # ESC (OSC 52 would set the clipboard), BEL, CR, LF, DEL and a C1 CSI.
    raw = "a\tb\x1b]52;c;ZXZpbA==\x07c\rd\ne\x7ff\x9bg"
    assert safe_text(raw) == "a\tb?]52;c;ZXZpbA==?c?d?e?f?g"


def test_safe_text_keeps_printable_unicode() -> None:
    assert safe_text("héllo ✓ 日本") == "héllo ✓ 日本"


def test_one_line_joins_lines_and_squeezes_white_space() -> None:
    assert one_line("  first\nsecond\r\n\tthird \x1b[31m  red ") == "first second third [31m red"


def test_to_json_sorts_keys_and_writes_datetimes_and_bytes() -> None:
    when = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    text = to_json({"b": b"caf\xc3\xa9 \xff", "a": when})
    assert json.loads(text) == {"a": "2025-01-02T03:04:05+00:00", "b": "café \ufffd"}
    assert text.index('"a"') < text.index('"b"')


def test_to_json_refuses_what_it_cannot_write() -> None:
    with pytest.raises(TypeError, match="cannot serialize object"):
        to_json({"x": object()})


def test_strip_metadata_drops_only_the_response_metadata() -> None:
    response = {"ResponseMetadata": {"HTTPStatusCode": 200}, "state": "RUNNING", "x": None}
    assert strip_metadata(response) == {"state": "RUNNING", "x": None}


def test_emit_json_writes_json_and_never_the_text(capsys: pytest.CaptureFixture[str]) -> None:
    called: list[bool] = []
    emit({"k": 1}, OutputFormat.json, lambda: called.append(True))
    assert json.loads(capsys.readouterr().out) == {"k": 1}
    assert called == []


def test_emit_text_calls_the_text_renderer_only(capsys: pytest.CaptureFixture[str]) -> None:
    emit({"k": 1}, OutputFormat.text, lambda: print("for people"))
    assert capsys.readouterr().out == "for people\n"


def test_table_prints_markup_and_controls_as_plain_text(
    capsys: pytest.CaptureFixture[str],
) -> None:
    table(["NAME", "STATE"], [["[red]web[/red]", None], ["a\x1b[2Jb", "[/]"]])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "STATE"]
    assert "[red]web[/red]" in lines[1]
    assert lines[1].split() == ["[red]web[/red]"]  # None is an empty cell
    assert "a?[2Jb" in lines[2]
    assert "[/]" in lines[2]
    assert "\x1b" not in out


def test_fields_skips_empty_values_and_formats_the_rest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    when = dt.datetime(2025, 1, 2, 3, 4, 5, 678, tzinfo=dt.UTC)
    fields(
        [
            ("none", None),
            ("empty", ""),
            ("nolist", []),
            ("nodict", {}),
            ("zero", 0),
            ("when", when),
            ("policy", {"b": 1, "a": when}),
            ("reason", "[bold]x[/bold]\x1b[31m"),
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "zero: 0",
        "when: 2025-01-02T03:04:05+00:00",
        'policy: {"b": 1, "a": "2025-01-02T03:04:05.000678+00:00"}',
        "reason: [bold]x[/bold]?[31m",
    ]
