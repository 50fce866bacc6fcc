"""The gin-syntax sweep file (format in `spec.py`): bindings of `sweep.*`, `NAME = value` macros
usable as `%NAME` below them, and `include 'other.gin'` relative to the file, read with gin's
own parser into a `SweepSpec`.
"""

from __future__ import annotations

import io
import os
import tokenize
from typing import Any, Iterable

from gin import config_parser

from research.sweep.gin_values import GinDelegate
from research.sweep.spec import MACRO_RE, PARAMS, SweepError, SweepSpec, suggest
from research.sweep.validate import check_axis_values, check_random


def load_sweep_file(path: str) -> SweepSpec:
    """Reads a gin-syntax sweep file (bindings of `sweep.*`; `NAME = value` macros usable as
    `%NAME` inside it; `include 'other.gin'` relative to the file)."""
    values: dict[str, Any] = {}
    _read_sweep_statements(path, values, {}, seen=set())
    spec = SweepSpec(sweep_file=os.path.abspath(path))
    for param, (value, where) in values.items():
        _set_param(spec, param, value, where)
    return spec


def _read_sweep_statements(path: str, values: dict[str, Any], macros: dict[str, Any],
                           seen: set[str]) -> None:
    """Collects `sweep.PARAM = value` into `values` (later bindings win), following includes."""
    real = os.path.realpath(path)
    if real in seen:
        raise SweepError(f"sweep file {path} includes itself; remove the include cycle.")
    seen.add(real)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise SweepError(f"cannot read sweep file {path}: {err.strerror}; check the path.") from None
    for st in _statements(path, text, macros):
        where = f"{path}:{st.location.line_num}"
        if isinstance(st, config_parser.IncludeStatement):
            inc = st.filename if os.path.isabs(st.filename) else os.path.join(
                os.path.dirname(path), st.filename)
            _read_sweep_statements(inc, values, macros, seen)
        elif isinstance(st, config_parser.BindingStatement):
            if st.scope:
                raise SweepError(f"{where}: scopes ({st.scope}/) mean nothing in a sweep file; "
                                 "bind sweep.PARAM directly.")
            if not st.arg_name and MACRO_RE.fullmatch(st.selector):
                macros[st.selector] = st.value  # sweep-file macro, usable as %NAME below
            elif st.selector == "sweep" and st.arg_name in PARAMS:
                values[st.arg_name] = (st.value, where)
            elif st.selector == "sweep":
                raise SweepError(f"{where}: sweep has no parameter {st.arg_name!r}; the parameters "
                                 f"are {', '.join(PARAMS)}.{suggest(st.arg_name, PARAMS)}")
            else:
                raise SweepError(
                    f"{where}: a sweep file binds only sweep.* ({st.selector}"
                    f"{'.' + st.arg_name if st.arg_name else ''} given); put training bindings in "
                    "sweep.fixed, e.g. sweep.fixed = {'TRAIN_STEPS': 300}.")
        else:
            raise SweepError(f"{where}: imports are not used in a sweep file; remove the line.")


def _statements(path: str, text: str, macros: dict[str, Any]) -> Iterable[Any]:
    """gin statements of a file, parsed lazily (a macro is known to the lines below it)."""
    parser = iter(config_parser.ConfigParser(io.StringIO(text), GinDelegate(macros)))
    while True:
        try:
            yield next(parser)
        except StopIteration:
            return
        except (SyntaxError, ValueError, tokenize.TokenError) as err:
            raise SweepError(f"sweep file {path}: {err}") from None


def _set_param(spec: SweepSpec, param: str, value: Any, where: str) -> None:
    """Type-checks one sweep parameter and stores it on the spec."""
    def need(ok: bool, expected: str, example: str) -> None:
        if not ok:
            raise SweepError(f"{where}: sweep.{param} must be {expected}, got {value!r}; "
                             f"e.g. sweep.{param} = {example}")
    if param == "gin_files":
        if isinstance(value, str):
            value = [value]
        need(isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
             "a list of gin file paths", "['configs/models/gpt_tiny.gin']")
        spec.gin_files = list(value)
    elif param in ("fixed", "grid", "zip", "random", "names"):
        need(isinstance(value, dict) and all(isinstance(k, str) for k in value),
             "a dict keyed by names", "{'LEARNING_RATE': ...}")
        if param in ("grid", "zip"):
            for axis, values in value.items():
                check_axis_values(axis, values, f"{where}: sweep.{param}")
            value = {k: list(v) for k, v in value.items()}
        elif param == "random":
            value = {k: check_random(k, v, f"{where}: sweep.random") for k, v in value.items()}
        elif param == "names":
            need(all(isinstance(v, str) for v in value.values()), "a dict of strings",
                 "{'LEARNING_RATE': 'lr', 'TransformerConfig.position': ''}")
        setattr(spec, param, dict(value))
    elif param in ("num_samples", "random_seed"):
        need(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
             "a non-negative int", "4")
        setattr(spec, param, value)
    elif param == "seed_axes":
        if isinstance(value, str):
            value = [value]
        need(isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
             "a list of axis names", "['SEED']")
        spec.seed_axes = list(value)
