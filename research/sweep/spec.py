"""Sweep specifications: the gin-syntax sweep file, command-line axes, and their expansion into
trials.

A sweep file binds parameters of one configurable, `sweep` (read with gin's own parser in the
sweep process; nothing is registered in the training configurables):

    sweep.gin_files = ['configs/models/gpt_tiny.gin', 'configs/runs/pretrain_causal.gin']
    sweep.fixed = {'TRAIN_STEPS': 300}                     # passed to every trial
    sweep.grid = {'LEARNING_RATE': [1e-3, 3e-3], 'WARMUP_STEPS': [0, 30]}      # product
    sweep.zip = {'pos': ['learned', 'rotary'],
                 'TransformerConfig.position': ['learned', 'rotary']}          # zipped
    sweep.random = {'SEED': ('int_uniform', 0, 1000)}     # drawn num_samples times
    sweep.num_samples = 2
    sweep.random_seed = 0
    sweep.names = {'LEARNING_RATE': 'lr', 'TransformerConfig.position': ''}
    sweep.seed_axes = ['SEED']

Trials are grid product x zip rows x random samples. A name with a '.' (configurable.param) or
an UPPERCASE macro name becomes `--gin.NAME=<gin literal>` for research.train, `gin_file` adds
`--gin_file=VALUE`, and any other name is a label (names the trial only). String values may
hold `{AXIS}` / `{root}` templates, filled per trial.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io
import itertools
import math
import os
import re
import tokenize
from typing import Any, Iterable, Sequence

from gin import config_parser

PARAMS = ("gin_files", "fixed", "grid", "zip", "random", "num_samples", "random_seed", "names",
          "seed_axes")
DISTRIBUTIONS = {"log_uniform": 2, "uniform": 2, "int_uniform": 2, "choice": 1}
MACRO_RE = re.compile(r"[A-Z][A-Z0-9_]*")
TEMPLATE_RE = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_./]*)\}")
UNSAFE_RE = re.compile(r"[^A-Za-z0-9._+-]+")
MAX_NAME_LEN = 200


class SweepError(ValueError):
    """A sweep specification problem; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class GinExpr:
    """A gin reference kept verbatim: `@Configurable()`, `@Configurable` or `%MACRO`."""
    text: str

    def __repr__(self) -> str:
        return self.text


# ------------------------------------------------------------------------ literals -----------

class _Delegate(config_parser.ParserDelegate):
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
        parser = config_parser.ConfigParser(stripped, _Delegate())
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


# ------------------------------------------------------------------------ the spec -----------

def kind_of(name: str) -> str:
    """'gin_file', 'binding' (configurable.param or UPPERCASE macro), or 'label'."""
    if name == "gin_file":
        return "gin_file"
    if "." in name or MACRO_RE.fullmatch(name):
        return "binding"
    return "label"


@dataclasses.dataclass
class SweepSpec:
    """Everything that defines a sweep, before expansion."""
    sweep_file: str | None = None
    gin_files: list[str] = dataclasses.field(default_factory=list)
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)
    grid: dict[str, list] = dataclasses.field(default_factory=dict)
    zip: dict[str, list] = dataclasses.field(default_factory=dict)
    random: dict[str, tuple] = dataclasses.field(default_factory=dict)
    num_samples: int | None = None
    random_seed: int = 0
    names: dict[str, str] = dataclasses.field(default_factory=dict)
    seed_axes: list[str] = dataclasses.field(default_factory=lambda: ["SEED"])

    def axes(self) -> list[str]:
        """Swept names in naming order: grid, zip, random."""
        return [*self.grid, *self.zip, *self.random]

    def short_name(self, axis: str) -> str:
        """The axis's name inside trial names ('' = left out)."""
        if axis in self.names:
            return self.names[axis]
        return axis.rsplit("/", 1)[-1].rsplit(".", 1)[-1]


@dataclasses.dataclass(frozen=True)
class Trial:
    """One point of the sweep: its name, axis values and what research.train gets."""
    name: str
    params: dict[str, Any]
    gin_files: tuple[str, ...]
    bindings: tuple[tuple[str, str], ...]  # (NAME, gin literal)

    def train_args(self, workdir: str) -> list[str]:
        """research.train's arguments for this trial (after `python -m research.train`)."""
        return ([f"--gin_file={f}" for f in self.gin_files]
                + [f"--gin.{name}={literal}" for name, literal in self.bindings]
                + [f"--workdir={workdir}"])


def _suggest(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


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
                                 f"are {', '.join(PARAMS)}.{_suggest(st.arg_name, PARAMS)}")
            else:
                raise SweepError(
                    f"{where}: a sweep file binds only sweep.* ({st.selector}"
                    f"{'.' + st.arg_name if st.arg_name else ''} given); put training bindings in "
                    "sweep.fixed, e.g. sweep.fixed = {'TRAIN_STEPS': 300}.")
        else:
            raise SweepError(f"{where}: imports are not used in a sweep file; remove the line.")


def _statements(path: str, text: str, macros: dict[str, Any]) -> Iterable[Any]:
    """gin statements of a file, parsed lazily (a macro is known to the lines below it)."""
    parser = iter(config_parser.ConfigParser(io.StringIO(text), _Delegate(macros)))
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
                _check_axis_values(axis, values, f"{where}: sweep.{param}")
            value = {k: list(v) for k, v in value.items()}
        elif param == "random":
            value = {k: _check_random(k, v, f"{where}: sweep.random") for k, v in value.items()}
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


def _check_axis_values(axis: str, values: Any, where: str) -> None:
    """Grid/zip axes are non-empty lists."""
    if not isinstance(values, (list, tuple)):
        raise SweepError(f"{where}[{axis!r}] must be a list of values, got {values!r}; write "
                         f"[{gin_literal(values) if _literal_ok(values) else '...'}] for one value.")
    if not values:
        raise SweepError(f"{where}[{axis!r}] is an empty axis (no values, so no trials); give it "
                         "at least one value or remove it.")


def _literal_ok(value: Any) -> bool:
    try:
        gin_literal(value)
        return True
    except SweepError:
        return False


def _check_random(axis: str, spec: Any, where: str) -> tuple:
    """('log_uniform'|'uniform'|'int_uniform', lo, hi) or ('choice', [values])."""
    usage = ("('log_uniform', 1e-4, 1e-2), ('uniform', 0.0, 1.0), ('int_uniform', 0, 100) or "
             "('choice', [1, 2])")
    if not isinstance(spec, (list, tuple)) or not spec or not isinstance(spec[0], str):
        raise SweepError(f"{where}[{axis!r}] = {spec!r}; a random axis is {usage}.")
    dist, args = spec[0], tuple(spec[1:])
    if dist not in DISTRIBUTIONS:
        raise SweepError(f"{where}[{axis!r}]: unknown distribution {dist!r}; use one of "
                         f"{', '.join(DISTRIBUTIONS)}.{_suggest(dist, DISTRIBUTIONS)}")
    if len(args) != DISTRIBUTIONS[dist]:
        raise SweepError(f"{where}[{axis!r}]: {dist} takes {DISTRIBUTIONS[dist]} argument(s), got "
                         f"{len(args)}; a random axis is {usage}.")
    if dist == "choice":
        _check_axis_values(axis, args[0], f"{where} choice")
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


# ------------------------------------------------------------------------ command line -------

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
        return name, _check_random(name, ("choice", items), where)
    args = [parse_gin_value(v, what=where) for v in rest.split(":")] if rest else []
    return name, _check_random(name, (dist, *args), where)


def _split_name(flag: str, text: str) -> tuple[str, str]:
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
    _validate_kinds(spec)
    return spec


def _validate_kinds(spec: SweepSpec) -> None:
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
                             f"{', '.join(owners) or 'none'}).{_suggest(axis, owners)}")


# ------------------------------------------------------------------------ expansion ----------

def _draw(rng, dist: tuple) -> Any:
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
    import numpy as np
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
            _check_axis_values(axis, values, f"sweep.{kind}")
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
                                 f"{_suggest(key, mapping)}")
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
    root = os.path.abspath(root)
    _validate_kinds(spec)
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
        "root": os.path.abspath(root),
        "trials": [{"name": t.name, "params": to_json(t.params)} for t in trials],
    }
