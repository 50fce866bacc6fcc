"""The sweep's command-line axes and bindings: --grid/--zip=NAME=V1,V2,
--random=NAME=DIST:ARGS, --gin.NAME=VALUE and --gin_file=F, merged into a `SweepSpec` (the
command line wins over the sweep file).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from research.sweep.gin_values import parse_gin_value, split_top_level
from research.sweep.spec import SweepError, SweepSpec
from research.sweep.validate import check_random, validate_kinds


def parse_axis_flag(flag: str, text: str) -> tuple[str, list]:
    """`NAME=V1,V2` (from --grid / --zip) -> (NAME, [values]); values are gin literals, bare
    words strings."""
    name, values = _split_name(flag, text)
    return name, [parse_gin_value(v, bare_strings=True, what=f"--{flag}={text}")
                  for v in split_top_level(values, f"--{flag}={text}")]


def parse_random_flag(text: str) -> tuple[str, tuple]:
    """`NAME=log_uniform:1e-4:1e-2`, `NAME=int_uniform:0:100`, `NAME=choice:a,b` -> axis."""
    name, body = _split_name("random", text)
    dist, _, rest = body.partition(":")
    where = f"--random={text}"
    if dist == "choice":
        items = [parse_gin_value(v, bare_strings=True, what=where)
                 for v in split_top_level(rest, where)]
        if len(items) == 1 and isinstance(items[0], (list, tuple)):
            items = list(items[0])
        return name, check_random(name, ("choice", items), where)
    args = [parse_gin_value(v, what=where) for v in rest.split(":")] if rest else []
    return name, check_random(name, (dist, *args), where)


def _split_name(flag: str, text: str) -> tuple[str, str]:
    """`NAME=VALUES` -> (NAME, VALUES); a missing name or empty value list is a SweepError."""
    name, eq, values = text.partition("=")
    name = name.strip()
    if not eq or not name:
        raise SweepError(f"--{flag}={text}: write --{flag}=NAME=V1,V2 "
                         "(e.g. --grid=LEARNING_RATE=1e-3,3e-3).")
    if not values.strip():
        raise SweepError(f"--{flag}={text}: empty axis {name!r} (no values); give at least one.")
    return name, values


def apply_cli(spec: SweepSpec, *, gin_files: Sequence[str] = (), bindings: Sequence[str] = (),
              grid: Sequence[str] = (), zips: Sequence[str] = (), random: Sequence[str] = (),
              num_samples: int | None = None, random_seed: int | None = None) -> SweepSpec:
    """Merges command-line flags into the spec; the command line wins over the file.

    --gin_file appends; --gin.NAME=VALUE (strings "NAME = VALUE" as split_gin_bindings gives
    them) fixes a binding, replacing the file's fixed value or pinning the file's axis NAME;
    --grid/--zip/--random add axes, replace the file's axis of the same kind, or sweep a name
    the file fixes. Giving one name twice on the command line, or as a file axis of another
    kind, is an error."""
    spec = dataclasses.replace(spec, gin_files=[*spec.gin_files, *gin_files], fixed=dict(spec.fixed),
                               grid=dict(spec.grid), zip=dict(spec.zip), random=dict(spec.random),
                               names=dict(spec.names))
    cli_fixed = set()
    for binding in bindings:
        name, _, value = binding.partition(" = ")
        name = name.strip()
        spec.fixed[name] = parse_gin_value(value, what=f"--gin.{name}")
        cli_fixed.add(name)
        for kind in ("grid", "zip", "random"):  # pinning a file axis to one value
            if getattr(spec, kind).pop(name, None) is not None:
                spec.names.pop(name, None)
    seen: dict[str, str] = {}
    for kind, flags, parse in (("grid", grid, lambda t: parse_axis_flag("grid", t)),
                               ("zip", zips, lambda t: parse_axis_flag("zip", t)),
                               ("random", random, parse_random_flag)):
        for text in flags:
            name, value = parse(text)
            if name in seen:
                raise SweepError(f"axis {name!r} is given twice on the command line (--{seen[name]} "
                                 f"and --{kind}); give it once.")
            seen[name] = kind
            for other in ("grid", "zip", "random"):
                if other != kind and name in getattr(spec, other):
                    raise SweepError(f"axis {name!r} is given twice: sweep.{other} in the sweep file "
                                     f"and --{kind}; remove one of them.")
            getattr(spec, kind)[name] = value
            if name not in cli_fixed:
                spec.fixed.pop(name, None)  # the file's fixed value gives way to the swept one
    if num_samples is not None:
        spec.num_samples = num_samples
    if random_seed is not None:
        spec.random_seed = random_seed
    validate_kinds(spec)
    return spec
