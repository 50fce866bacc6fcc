"""Helpful errors for gin configs, each one line naming the culprit and the fix: a syntax
error names the file (or --gin flag) and line; misspelled configurables, parameters and macros
name their closest registered spelling; required values left unset name the macro or binding
to set. `research.config.parse_gin` raises them as ConfigErrors."""

from __future__ import annotations

import difflib
import inspect
import os
import re
import tokenize
from typing import Any, Iterable, Sequence

import gin

from research.errors import ConfigError
from research.training.run_config import EXAMPLES, MACROS


def _registered() -> dict[str, list[str]]:
    """{configurable name (short and full): parameter names} of every registered configurable."""
    out: dict[str, list[str]] = {}
    for selector, c in gin.config._REGISTRY.items():  # noqa: SLF001 - no public listing
        if c.module == "gin":
            continue
        try:
            target = c.wrapped.__init__ if inspect.isclass(c.wrapped) else c.wrapped
            params = [p for p in inspect.signature(target).parameters if p not in ("self", "cls")]
            if inspect.isclass(c.wrapped) and not params and hasattr(c.wrapped, "__dataclass_fields__"):
                params = list(c.wrapped.__dataclass_fields__)
        except (TypeError, ValueError):
            params = []
        out[c.name] = params
        out[selector] = params
    return out


def _suggest(word: str, options: Iterable[str], n: int = 3) -> str:
    options = sorted(set(options))
    close = difflib.get_close_matches(word, options, n=n, cutoff=0.6)
    if not close:
        lowered = {o.lower(): o for o in options}
        close = [lowered[c] for c in difflib.get_close_matches(word.lower(), list(lowered), n=n,
                                                                cutoff=0.5)]
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


_INCLUDE = re.compile(r"^\s*include\s+['\"]([^'\"]+)['\"]", flags=re.M)


def _gin_texts(files: Sequence[str], search_root: str) -> list[str]:
    """Text of the gin files and (recursively) their includes. ConfigError naming the file and
    line of an `include` whose file exists neither as given nor under `search_root` (gin
    itself fails on some of those with a TypeError)."""
    texts, seen, todo = [], set(), list(files)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        texts.append(text)
        for m in _INCLUDE.finditer(text):
            name = m.group(1)
            found = [p for p in (name, os.path.join(search_root, name)) if os.path.isfile(p)]
            if not found:
                line = text.count("\n", 0, m.start()) + 1
                raise ConfigError(f"gin file {path}, line {line}: include {name!r} not found "
                                  f"(looked in the current directory and {search_root}); fix "
                                  "the path.")
            todo.append(found[0])
    return texts


def check_gin_bindings(files: Sequence[str], bindings: Sequence[str], search_root: str) -> None:
    """Before parsing: a macro override (`NAME = value`, no dot) must name a macro that the
    config files define or reference; otherwise it would silently do nothing."""
    texts = _gin_texts(files, search_root)
    known = set()
    for text in [*texts, *bindings]:
        known |= set(re.findall(r"%([A-Za-z_]\w*)", text))
    for text in texts:
        known |= set(re.findall(r"^([A-Za-z_]\w*)\s*=", text, flags=re.M))
    for binding in bindings:
        name = binding.split("=", 1)[0].strip()
        if "." in name or "/" in name or name in known:
            continue
        raise ConfigError(
            f"--gin.{name}: no macro {name!r} is defined or used by the gin files "
            f"({', '.join(files) or 'none given'}), so it would change nothing."
            f"{_suggest(name, known)} Macros are in the run config (configs/runs/*.gin); "
            "to set a parameter directly use --gin.configurable.parameter=VALUE.")


_GIN_FILE_LOCATION = re.compile(r'In file "([^"]+)", line (\d+)')
_UNKNOWN_CONFIGURABLE = re.compile(r"No configurable matching (?:reference )?'@?([\w./]+)")
_UNKNOWN_PARAMETER = re.compile(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'")
SYNTAX_HINT = ("gin syntax is NAME = VALUE, one per line, VALUE a Python literal, @configurable "
               "or %MACRO (strings quoted: 'text:data/*.txt')")


def explain_gin_error(err: Exception) -> str | None:
    """One line for gin's unknown-configurable / unknown-parameter errors (the closest
    registered names, where to look them up), or None for other errors."""
    text = str(err)
    registry = _registered()
    m = _UNKNOWN_CONFIGURABLE.search(text)
    if m:
        return (f"unknown gin configurable {m.group(1)!r}.{_suggest(m.group(1), registry)} "
                "Registered configurables are listed in research/configurables.py.")
    m = _UNKNOWN_PARAMETER.search(text)
    if m:
        name, param = m.groups()
        params = registry.get(name, [])
        return (f"{name} has no parameter {param!r}.{_suggest(param, params)} "
                f"Its parameters: {', '.join(params) or '(unknown)'}.")
    return None


def explain_parse_error(err: Exception, source: str) -> str | None:
    """One line for an error gin raised while parsing `source` ("gin file PATH" or a
    "--gin.NAME=VALUE" flag): where (file and line; an included file names itself), what and
    how to fix it. None if `err` is not about the config text."""
    where, quoted = source, ""
    location = _GIN_FILE_LOCATION.search(str(err))
    if isinstance(err, SyntaxError) and err.filename:
        where = f"gin file {err.filename}, line {err.lineno}"
    elif location:
        where = f"gin file {location.group(1)}, line {location.group(2)}"
    if isinstance(err, SyntaxError):
        if where != source or not source.startswith("--gin."):  # a flag shows its own text
            quoted = f" in `{(err.text or '').strip()}`"
        token = re.search(r"Failed to parse token '([^']*)'", err.msg or "")
        if token:  # a bare word: gin's "malformed node or string ... <ast.Name object>"
            return f"{where}: {token.group(1)!r}{quoted} is not a gin value; {SYNTAX_HINT}."
        what = (err.msg or "invalid syntax").splitlines()[0].rstrip(".")
        return f"{where}: {what}{quoted}; {SYNTAX_HINT}."
    if isinstance(err, tokenize.TokenError):
        return (f"{where}: a bracket or quote is opened and never closed ({err.args[0]}); "
                f"{SYNTAX_HINT}.")
    if isinstance(err, ImportError):
        return f"{where}: cannot import {err.name or err}; check the `import` line's module name."
    if isinstance(err, (ValueError, OSError)):  # OSError: an `include` of a missing file
        what = explain_gin_error(err) or str(err).split("\n")[0]
        return f"{where}: {what}"
    return None


_MISSING_MACRO = re.compile(r"No bindings specified for '([A-Za-z_]\w*)/gin\.macro'")
_REQUIRED_LEFT = re.compile(r"^([\w./]+?)(?:/macro\.value|\.(\w+)) set to `%gin\.REQUIRED`")


def _users(macro: str, texts: Sequence[str]) -> list[str]:
    """Bindings ('train.vocab') whose value is `%macro` in the gin texts."""
    out = []
    for text in texts:
        for m in re.finditer(rf"^\s*([\w./]+)\s*=\s*%{macro}\b", text, flags=re.M):
            if m.group(1) not in out and "." in m.group(1):
                out.append(m.group(1))
    return out


def _missing_text(binding: str | None, macro: str | None) -> str:
    param = binding.rsplit(".", 1)[-1] if binding else (macro or "").lower()
    example = EXAMPLES.get(param, "VALUE")
    if macro:
        what = binding or f"macro {macro}"
        return (f"{what} is required: set {macro} in the run config or pass "
                f"--gin.{macro}={example}")
    return (f"{binding} is required: bind it in the run config ({binding} = ...) or pass "
            f"--gin.{binding}={example}")


def explain_missing_required(err: Exception, files: Sequence[str], bindings: Sequence[str],
                             search_root: str) -> str | None:
    """One line naming every required value left unset (a macro no file defines, a macro or
    binding left at %gin.REQUIRED) and how to set it; None if `err` is not about that."""
    text = str(err)
    first = _MISSING_MACRO.search(text)
    left = _REQUIRED_LEFT.search(text)
    if not first and not left:
        return None
    texts = [*_gin_texts(files, search_root), *bindings]
    referenced = {m for t in texts for m in re.findall(r"%([A-Za-z_]\w*)\b(?!\.)", t)}
    defined = {m for t in texts for m in re.findall(r"^\s*([A-Za-z_]\w*)\s*=", t, flags=re.M)}
    macros = sorted(referenced - defined)
    for b in bindings:  # --gin.NAME=%gin.REQUIRED
        name, _, value = b.partition("=")
        if value.strip() == "%gin.REQUIRED" and "." not in name.strip():
            macros.append(name.strip())
    if first:
        macros.append(first.group(1))
    direct = []
    if left:
        if left.group(2) is None:
            macros.append(left.group(1))
        else:
            direct.append(f"{left.group(1)}.{left.group(2)}")
    parts = []
    for macro in dict.fromkeys(macros):
        for binding in _users(macro, texts) or [None]:
            parts.append(_missing_text(binding, macro))
    parts += [_missing_text(b, None) for b in direct]
    return "; ".join(parts) + "."


def check_required_bindings(fn: Any, name: str, files: Sequence[str], bindings: Sequence[str],
                            search_root: str) -> None:
    """After parsing: every gin.REQUIRED parameter of configurable `name` (function `fn`) is
    bound; otherwise ConfigError naming them all and the macro to set."""
    missing = []
    for param, p in inspect.signature(fn).parameters.items():
        if p.default is not gin.REQUIRED:
            continue
        try:
            gin.query_parameter(f"{name}.{param}")
        except ValueError:
            missing.append(param)
    if not missing:
        return
    texts = _gin_texts(files, search_root)
    parts = []
    for param in missing:
        macro = MACROS.get(param)
        # Suggest the macro only if the gin files define it (otherwise the override is refused).
        known = macro and any(re.search(rf"^\s*{macro}\s*=", t, flags=re.M) for t in texts)
        parts.append(_missing_text(f"{name}.{param}", macro if known else None))
    raise ConfigError("; ".join(parts) + ".")

