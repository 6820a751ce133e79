"""Docker's word processing: quote removal and ``$VAR`` / ``${VAR...}`` substitution.

A port of the rules of BuildKit's ``frontend/dockerfile/shell/lex.go`` (``ProcessWord``), used
for the instructions Docker expands at build time (FROM, ENV, ARG, COPY, ADD, WORKDIR, USER,
EXPOSE, LABEL): single quotes are literal, double quotes allow ``$`` expansion and escape only
``"``, ``$`` and the escape character, the escape character (``\\`` or the ``# escape=``
directive's) makes the next character literal. Supported forms: ``$X``, ``${X}``,
``${X:-w}``, ``${X-w}``, ``${X:+w}``, ``${X+w}``, ``${X:?msg}``, ``${X?msg}``. RUN, CMD and
ENTRYPOINT are not expanded here: their shell does it with the build's environment.
"""

from __future__ import annotations

from collections.abc import Mapping

from embervm.errors import BuildFailure

#: Bytes of variable values one word (or heredoc body) may substitute in all: ``$A$A$A…``
#: cannot multiply a value without bound (audit A4: eleven such lines asked for 16 GiB).
MAX_EXPANSION = 1024 * 1024


def _is_name_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


class _Lexer:
    def __init__(
        self, text: str, env: Mapping[str, str], escape: str, *, quotes: bool = True
    ) -> None:
        self.s = text
        self.i = 0
        self.env = env
        self.esc = escape
        self.quotes = quotes
        self.substituted = 0

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def next(self) -> str:
        ch = self.peek()
        self.i += 1
        return ch

    def word(self, stop: str = "") -> list[str]:
        """Process until ``stop`` (unquoted) or the end; returns words (split on blanks)."""
        words: list[str] = []
        cur: list[str] = []
        seen = False  # a quoted empty string still makes a word
        while self.i < len(self.s):
            ch = self.peek()
            if stop and ch == stop:
                break
            if ch in " \t\n" and not stop:
                self.next()
                if cur or seen:
                    words.append("".join(cur))
                cur, seen = [], False
                continue
            seen = True
            if not self.quotes and ch == self.esc and self.s[self.i + 1 : self.i + 2] == "$":
                self.next()
                cur.append(self.next())
            elif not self.quotes and ch != "$":
                cur.append(self.next())
            elif ch == self.esc:
                self.next()
                nxt = self.next()
                cur.append(nxt if nxt else self.esc)
            elif ch == "'":
                self.next()
                cur.append(self._single())
            elif ch == '"':
                self.next()
                cur.append(self._double())
            elif ch == "$":
                self.next()
                cur.append(self._charge(self._dollar()))
            else:
                self.next()
                cur.append(ch)
        if cur or seen:
            words.append("".join(cur))
        return words

    def _single(self) -> str:
        end = self.s.find("'", self.i)
        if end < 0:
            raise BuildFailure(f"unterminated single quote in {self.s[:200]!r}")
        out = self.s[self.i : end]
        self.i = end + 1
        return out

    def _double(self) -> str:
        out: list[str] = []
        while True:
            if self.i >= len(self.s):
                raise BuildFailure(f"unterminated double quote in {self.s[:200]!r}")
            ch = self.next()
            if ch == '"':
                return "".join(out)
            if ch == "$":
                out.append(self._charge(self._dollar()))
            elif ch == self.esc:
                nxt = self.peek()
                if nxt in ('"', "$", self.esc):
                    out.append(self.next())
                else:
                    out.append(ch)
            else:
                out.append(ch)

    def _name(self) -> str:
        start = self.i
        if self.peek().isdigit():
            self.next()
            return self.s[start : self.i]
        while self.peek() and _is_name_char(self.peek()):
            self.next()
        return self.s[start : self.i]

    def _charge(self, value: str) -> str:
        self.substituted += len(value)
        if self.substituted > MAX_EXPANSION:
            raise BuildFailure(
                f"variable expansion too long: {self.s[:80]!r} substitutes more than "
                f"{MAX_EXPANSION} bytes"
            )
        return value

    def _dollar(self) -> str:
        ch = self.peek()
        if ch != "{":
            name = self._name()
            return self.env.get(name, "") if name else "$"
        self.next()
        name = self._name()
        if not name:
            raise BuildFailure(f"bad substitution in {self.s[:200]!r}")
        value = self.env.get(name)
        ch = self.next()
        if ch == "}":
            return value or ""
        colon = ch == ":"
        if colon:
            ch = self.next()
        if ch not in "-+?" or not ch:
            raise BuildFailure(f"unsupported modifier in ${{{name}...}} of {self.s[:200]!r}")
        inner = _Lexer(self.s, self.env, self.esc)
        inner.i = self.i
        inner.substituted = self.substituted
        parts = inner.word(stop="}")
        self.substituted = inner.substituted
        if inner.peek() != "}":
            raise BuildFailure(f"missing '}}' in {self.s[:200]!r}")
        self.i = inner.i + 1
        arg = " ".join(parts)
        unset = value is None or (colon and value == "")
        if ch == "-":
            return arg if unset else (value or "")
        if ch == "+":
            return "" if unset else arg
        if unset:
            raise BuildFailure(f"{name} is not set: {arg or 'a value is required'}")
        return value or ""


def expand(word: str, env: Mapping[str, str], *, escape: str = "\\") -> str:
    """One word, quotes removed and variables substituted (blanks are kept)."""
    lexer = _Lexer(word, env, escape)
    out: list[str] = []
    while lexer.i < len(lexer.s):
        out.extend(lexer.word(stop="\0"))
        if lexer.peek() == "\0":
            out.append(lexer.next())
    return "".join(out)


def expand_fields(text: str, env: Mapping[str, str], *, escape: str = "\\") -> list[str]:
    """Split ``text`` into words on unquoted blanks, each expanded (Docker's ProcessWords)."""
    return _Lexer(text, env, escape).word()


def expand_text(text: str, env: Mapping[str, str], *, escape: str = "\\") -> str:
    """Substitute variables in free text (heredoc bodies): quotes and blanks are kept."""
    lexer = _Lexer(text, env, escape, quotes=False)
    out: list[str] = []
    while lexer.i < len(lexer.s):
        out.extend(lexer.word(stop="\0"))
        if lexer.peek() == "\0":
            out.append(lexer.next())
    return "".join(out)
