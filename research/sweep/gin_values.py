"""Gin literals in a sweep: parsing the values of a sweep file and of --grid/--zip/--random/--gin
flags (with gin's own parser), splitting flag value lists, and writing values back as the gin
literals research.train's `--gin.NAME=` takes.
"""

from __future__ import annotations

import dataclasses
import math
import tokenize
from typing import Any

from gin import config_parser

from research.sweep.spec import SweepError


@dataclasses.dataclass(frozen=True)
class GinExpr:
    """A gin reference kept verbatim: `@Configurable()`, `@Configurable` or `%MACRO`."""
    text: str

    def __repr__(self) -> str:
        return self.text


class GinDelegate(config_parser.ParserDelegate):
    """Keeps configurable references and macros as GinExpr (or a sweep-file macro's value)."""

    def __init__(self, macros: dict[str, Any] | None = None):
        self.macros = macros if macros is not None else {}

    def configurable_reference(self, scoped_configurable_name: str, evaluate: bool) -> GinExpr:
        return GinExpr("@" + scoped_configurable_name + ("()" if evaluate else ""))

    def macro(self, macro_name: str) -> Any:
        if macro_name in self.macros:
            return self.macros[macro_name]
        return GinExpr("%" + macro_name)


def parse_gin_value(text: str, *, bare_strings: bool = False, what: str = "value") -> Any:
    """Parses one gin literal (numbers, strings, None, True/False, lists, tuples, dicts,
    `@ref()`, `%MACRO`). With `bare_strings`, text that is not a literal is the string itself
    (`learned` -> 'learned'); otherwise it is a SweepError naming `what`."""
    stripped = text.strip()
    try:
        parser = config_parser.ConfigParser(stripped, GinDelegate())
        value = parser.parse_value()
        if parser.current_token.type not in (tokenize.NEWLINE, tokenize.ENDMARKER):
            raise SyntaxError(f"unexpected {parser.current_token.string!r} after the value")
    except (SyntaxError, ValueError, tokenize.TokenError, IndentationError) as err:
        if bare_strings and stripped:
            return stripped
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SweepError(f"{what}: {text!r} is not a gin literal ({first}); strings need quotes, "
                         f"e.g. --gin.TRAIN_DATA=\"'text:data/*.txt'\"") from None
    return value


def split_top_level(text: str, what: str = "value list") -> list[str]:
    """Splits at commas outside quotes and brackets: "1,'a,b',[2,3]" -> ["1", "'a,b'", "[2,3]"]."""
    parts: list[str] = []
    buf: list[str] = []
    depth, quote, escaped = 0, "", False
    for ch in text:
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise SweepError(f"{what}: unbalanced {ch!r} in {text!r}; check the brackets.")
        elif ch == "," and depth == 0:
            parts.append("".join(buf).strip())
            buf = []
            continue
        buf.append(ch)
    if quote or depth:
        raise SweepError(f"{what}: unclosed {'quote' if quote else 'bracket'} in {text!r}; "
                         "quote the whole flag in the shell, e.g. --grid=\"NAME='a,b','c'\".")
    parts.append("".join(buf).strip())
    if any(not p for p in parts):
        raise SweepError(f"{what}: empty value in {text!r} (a doubled or trailing comma?); "
                         "write NAME=V1,V2,...")
    return parts


def gin_literal(value: Any) -> str:
    """The gin literal for a value, as `--gin.NAME=` takes it (strings quoted)."""
    if isinstance(value, GinExpr):
        return value.text
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SweepError(f"{value!r} has no gin literal; use a finite number.")
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(gin_literal(v) for v in value) + "]"
    if isinstance(value, tuple):
        inner = ", ".join(gin_literal(v) for v in value)
        return "(" + inner + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{gin_literal(k)}: {gin_literal(v)}" for k, v in value.items()) + "}"
    raise SweepError(f"{value!r} ({type(value).__name__}) cannot be written as a gin literal; use "
                     "numbers, strings, None, booleans, lists, tuples or dicts.")


def to_json(value: Any) -> Any:
    """JSON form of a value: tuples become lists, gin references their text."""
    if isinstance(value, GinExpr):
        return value.text
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    return value
