"""Expansion of a `SweepSpec` into its trials: the axis values of every trial (grid product x
zip rows x random samples), each trial's name, its `{AXIS}`/`{root}` templates filled, its
research.train arguments; and ROOT/sweep.json's contents.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import re
from typing import Any, Sequence

import numpy as np

from research import storage
from research.sweep.gin_values import gin_literal, to_json
from research.sweep.spec import SweepError, SweepSpec, Trial, kind_of, suggest
from research.sweep.validate import check_axis_values, validate_kinds

TEMPLATE_RE = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_./]*)\}")
UNSAFE_RE = re.compile(r"[^A-Za-z0-9._+-]+")
MAX_NAME_LEN = 200


def _draw(rng: np.random.Generator, dist: tuple) -> Any:
    """One draw; floats rounded to 4 significant digits (so names show the exact value)."""
    kind = dist[0]
    if kind == "choice":
        return dist[1][int(rng.integers(len(dist[1])))]
    lo, hi = dist[1], dist[2]
    if kind == "int_uniform":
        return int(rng.integers(lo, hi + 1))
    if kind == "uniform":
        x = float(rng.uniform(lo, hi))
    else:
        x = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return float(f"{x:.4g}")


def random_samples(spec: SweepSpec) -> list[dict[str, Any]]:
    """The random axes' draws (reproducible from random_seed); [{}] when there are none."""
    if not spec.random:
        if spec.num_samples:
            raise SweepError(f"num_samples = {spec.num_samples} but there are no random axes; add "
                             "sweep.random (or --random=NAME=log_uniform:LO:HI) or drop num_samples.")
        return [{}]
    if not spec.num_samples:
        raise SweepError("random axes need a number of draws: set sweep.num_samples = N (or "
                         "--num_samples=N).")
    rng = np.random.default_rng(spec.random_seed)
    return [{axis: _draw(rng, dist) for axis, dist in spec.random.items()}
            for _ in range(spec.num_samples)]


def points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Axis values of every trial: grid product x zip rows x random samples, in that nesting."""
    lengths = {axis: len(v) for axis, v in spec.zip.items()}
    if len(set(lengths.values())) > 1:
        raise SweepError("zip axes have unequal lengths (" + ", ".join(
            f"{a}: {n}" for a, n in lengths.items()) + "); zipped axes need one value each per "
            "row: make the lists equally long, or move an axis to the grid.")
    for kind in ("grid", "zip"):
        for axis, values in getattr(spec, kind).items():
            check_axis_values(axis, values, f"sweep.{kind}")
    grid = [dict(zip(spec.grid, combo)) for combo in itertools.product(*spec.grid.values())]
    rows = [dict(zip(spec.zip, row)) for row in zip(*spec.zip.values())] if spec.zip else [{}]
    samples = random_samples(spec)
    return [{**g, **z, **r} for g, z, r in itertools.product(grid, rows, samples)]


def format_value(axis: str, value: Any) -> str:
    """A value as shown in names and templates: floats '%.4g', gin files by their stem."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        if axis == "gin_file":
            return os.path.splitext(os.path.basename(value))[0]
        return value
    if isinstance(value, int):
        return str(value)
    return gin_literal(value)


def _safe(text: str) -> str:
    """`text` with runs of characters unsafe in a directory name replaced by '_'."""
    return UNSAFE_RE.sub("_", text).strip("_") or "_"


def trial_name(spec: SweepSpec, params: dict[str, Any]) -> str:
    """`short=value` for each named axis joined with ','; 'trial' when nothing is named."""
    parts = [f"{_safe(spec.short_name(a))}={_safe(format_value(a, params[a]))}"
             for a in spec.axes() if spec.short_name(a)]
    name = ",".join(parts) or "trial"
    if name.startswith("."):
        name = "_" + name
    if len(name) > MAX_NAME_LEN:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = name[:MAX_NAME_LEN - 11] + "-" + digest
    return name


def fill_templates(value: Any, mapping: dict[str, str], where: str) -> Any:
    """Replaces `{NAME}` in strings (recursively in lists/tuples/dicts); `{{`/`}}` are literal
    braces in a string that holds a template."""
    if isinstance(value, str):
        if not any(m.group(1) for m in TEMPLATE_RE.finditer(value)):
            return value

        def sub(m: re.Match) -> str:
            if m.group(0) in ("{{", "}}"):
                return m.group(0)[0]
            key = m.group(1)
            if key not in mapping:
                names = sorted(k for k in mapping if k != "root")
                raise SweepError(f"{where}: template {value!r} names {{{key}}}, which is not an "
                                 f"axis (axes: {', '.join(names) or 'none'}; also {{root}})."
                                 f"{suggest(key, mapping)}")
            return mapping[key]
        return TEMPLATE_RE.sub(sub, value)
    if isinstance(value, list):
        return [fill_templates(v, mapping, where) for v in value]
    if isinstance(value, tuple):
        return tuple(fill_templates(v, mapping, where) for v in value)
    if isinstance(value, dict):
        return {k: fill_templates(v, mapping, where) for k, v in value.items()}
    return value


def _template_mapping(spec: SweepSpec, params: dict[str, Any], root: str) -> dict[str, str]:
    """{template name: text} of one trial: its axes (also by short name) and `root`."""
    mapping = {}
    for axis, value in params.items():
        text = format_value("", value)
        mapping[axis] = text
        short = spec.short_name(axis)
        if short and short not in params:
            mapping.setdefault(short, text)
    mapping["root"] = root
    return mapping


def expand(spec: SweepSpec, root: str) -> list[Trial]:
    """All trials of the sweep, in order, with names checked for uniqueness."""
    root = storage.resolve(root)
    validate_kinds(spec)
    has_gin_file_axis = "gin_file" in spec.axes()
    if not spec.gin_files and not has_gin_file_axis:
        raise SweepError("no gin files: set sweep.gin_files in the sweep file or pass "
                         "--gin_file=configs/models/... --gin_file=configs/runs/...")
    trials, by_name = [], {}
    for params in points(spec):
        name = trial_name(spec, params)
        if name in by_name:
            raise SweepError(
                f"two trials get the name {name!r}: {to_json(by_name[name])} and "
                f"{to_json(params)}; names leave out axes renamed to '' in sweep.names and show "
                "floats to 4 digits, so give those axes (distinct) short names.")
        by_name[name] = params
        mapping = _template_mapping(spec, params, root)
        gin_files = [fill_templates(f, mapping, "sweep.gin_files") for f in spec.gin_files]
        bindings = [(k, gin_literal(fill_templates(v, mapping, f"sweep.fixed[{k!r}]")))
                    for k, v in spec.fixed.items()]
        for axis in spec.axes():
            value = fill_templates(params[axis], mapping, f"axis {axis!r}")
            if kind_of(axis) == "gin_file":
                gin_files.extend([value] if isinstance(value, str) else list(value))
            elif kind_of(axis) == "binding":
                bindings.append((axis, gin_literal(value)))
        trials.append(Trial(name, params, tuple(gin_files), tuple(bindings)))
    return trials


def sweep_json(spec: SweepSpec, trials: Sequence[Trial], root: str) -> dict[str, Any]:
    """The contents of ROOT/sweep.json."""
    axes = spec.axes()
    return {
        "sweep_file": spec.sweep_file,
        "base_gin_files": list(spec.gin_files),
        "fixed": to_json(spec.fixed),
        "axes": axes,
        "seed_axes": list(spec.seed_axes),
        "labels": [a for a in axes if kind_of(a) == "label"],
        "names": {a: spec.short_name(a) for a in axes},
        "root": storage.resolve(root),
        "trials": [{"name": t.name, "params": to_json(t.params)} for t in trials],
    }
