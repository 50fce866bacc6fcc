"""Checks of a sweep's axes and names, shared by the sweep file and the command line: grid/zip
axes are non-empty lists, random axes name a known distribution with valid bounds, an axis
lives in one place, fixed names reach research.train, and sweep.names refers to axes.
"""

from __future__ import annotations

from typing import Any

from research.sweep.gin_values import gin_literal
from research.sweep.spec import DISTRIBUTIONS, SweepError, SweepSpec, kind_of, suggest


def check_axis_values(axis: str, values: Any, where: str) -> None:
    """Grid/zip axes are non-empty lists."""
    if not isinstance(values, (list, tuple)):
        raise SweepError(f"{where}[{axis!r}] must be a list of values, got {values!r}; write "
                         f"[{gin_literal(values) if _literal_ok(values) else '...'}] for one value.")
    if not values:
        raise SweepError(f"{where}[{axis!r}] is an empty axis (no values, so no trials); give it "
                         "at least one value or remove it.")


def _literal_ok(value: Any) -> bool:
    """Whether `value` has a gin literal (to quote it in a message)."""
    try:
        gin_literal(value)
        return True
    except SweepError:
        return False


def check_random(axis: str, spec: Any, where: str) -> tuple:
    """('log_uniform'|'uniform'|'int_uniform', lo, hi) or ('choice', [values])."""
    usage = ("('log_uniform', 1e-4, 1e-2), ('uniform', 0.0, 1.0), ('int_uniform', 0, 100) or "
             "('choice', [1, 2])")
    if not isinstance(spec, (list, tuple)) or not spec or not isinstance(spec[0], str):
        raise SweepError(f"{where}[{axis!r}] = {spec!r}; a random axis is {usage}.")
    dist, args = spec[0], tuple(spec[1:])
    if dist not in DISTRIBUTIONS:
        raise SweepError(f"{where}[{axis!r}]: unknown distribution {dist!r}; use one of "
                         f"{', '.join(DISTRIBUTIONS)}.{suggest(dist, DISTRIBUTIONS)}")
    if len(args) != DISTRIBUTIONS[dist]:
        raise SweepError(f"{where}[{axis!r}]: {dist} takes {DISTRIBUTIONS[dist]} argument(s), got "
                         f"{len(args)}; a random axis is {usage}.")
    if dist == "choice":
        check_axis_values(axis, args[0], f"{where} choice")
        return (dist, list(args[0]))
    lo, hi = args
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in args)
    if not numeric or not lo <= hi:
        raise SweepError(f"{where}[{axis!r}]: {dist} needs numbers lo <= hi, got {lo!r}, {hi!r}.")
    if dist == "log_uniform" and lo <= 0:
        raise SweepError(f"{where}[{axis!r}]: log_uniform needs lo > 0, got {lo!r}.")
    if dist == "int_uniform" and not all(isinstance(x, int) for x in args):
        raise SweepError(f"{where}[{axis!r}]: int_uniform needs int bounds, got {lo!r}, {hi!r}.")
    return (dist, lo, hi)


def validate_kinds(spec: SweepSpec) -> None:
    """Cross-checks: an axis in one place only, fixed names are bindings, names refer to axes."""
    owners: dict[str, str] = {}
    for kind in ("grid", "zip", "random"):
        for axis in getattr(spec, kind):
            if axis in owners:
                raise SweepError(f"axis {axis!r} is given twice (sweep.{owners[axis]} and "
                                 f"sweep.{kind}); keep it in one of them.")
            owners[axis] = kind
            if axis == "root":
                raise SweepError("'root' is reserved for the {root} template; rename the axis.")
    for name in spec.fixed:
        if name in owners:
            raise SweepError(f"{name!r} is both fixed (sweep.fixed, or --gin.{name} with --{owners[name]}) "
                             f"and swept ({owners[name]}); drop one of them (--gin.{name}=VALUE "
                             "alone pins a sweep file's axis).")
        if kind_of(name) == "label":
            raise SweepError(f"fixed name {name!r} is neither a gin binding (configurable.param) "
                             "nor a macro (UPPERCASE), so research.train would never see it; fix "
                             "the spelling (labels belong in sweep.grid / sweep.zip).")
        if name == "gin_file":
            raise SweepError("gin_file cannot be fixed; list the files in sweep.gin_files or pass "
                             "--gin_file=F.")
    for axis in spec.names:
        if axis not in owners:
            raise SweepError(f"sweep.names has {axis!r}, which is not an axis (axes: "
                             f"{', '.join(owners) or 'none'}).{suggest(axis, owners)}")
