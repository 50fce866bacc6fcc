"""Keeping work safe: preemption signals, the workdir lock, the resume-config check, and
helpful errors for misspelled gin bindings.

* `PreemptionGuard`: SIGTERM/SIGINT during `train` ask the loop to finish its step, save a
  checkpoint and exit cleanly (a second signal stops at once, without a checkpoint).
* `WorkdirLock`: DIR/.lock (fcntl.flock, held by process 0) so two runs never train into one DIR.
* `check_resume_config`: a DIR that already has a config.gin only resumes with the same
  bindings (run length, logging/eval/checkpoint cadence, the progress bar and layout-only
  bindings such as MESH_SHAPE, the sharding rules and the remat policy may change).
* `check_gin_bindings` / `explain_gin_error`: unknown configurables, parameters and macros name
  their closest registered spelling.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import os
import re
import shlex
import signal
import socket
import sys
import threading
from typing import Any, Iterable, Sequence


class ReliabilityError(RuntimeError):
    """A run refused or stopped to protect its work; the message says what to do."""


class WorkdirLockedError(ReliabilityError):
    pass


class ConfigMismatchError(ReliabilityError):
    pass


class NonFiniteError(ReliabilityError):
    pass


def resume_command() -> str:
    """The command line that started this process, for 'resume with ...' messages."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("research", "train.py")):
        return "python -m research.train " + shlex.join(argv[1:])
    return shlex.join([os.path.basename(sys.executable), *argv])


# ------------------------------------------------------------------------ preemption ----------

class PreemptionGuard:
    """Context manager: while active (main thread only), SIGTERM and SIGINT set `requested`
    instead of killing the process; the previous handlers come back on exit. A second
    signal raises KeyboardInterrupt (stop now, no checkpoint)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            raise KeyboardInterrupt(f"second {name}: stopping now without a checkpoint")
        self.signal_name = name
        logging.warning("received %s: finishing the current step, then saving a checkpoint "
                        "and exiting (send it again to stop at once without saving).", name)

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


# ------------------------------------------------------------------------ workdir lock --------

class WorkdirLock:
    """An exclusive, non-blocking flock on DIR/.lock holding 'pid host'. The OS drops it when
    the process dies (kill -9 included), so a stale file never blocks a restart."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(os.path.abspath(workdir), ".lock")
        self.enabled = enabled
        self._fd: int | None = None

    def acquire(self) -> None:
        if not self.enabled:
            return
        import fcntl
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise WorkdirLockedError(
                f"{os.path.dirname(self.path)} is in use by another training run ({holder}; lock "
                f"file {self.path}). Wait for it to finish or stop it, or pick a new --workdir.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            import fcntl
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------ resume config -------

# Bindings a resumed run may change: run length and cadences that do not alter the math.
RESUMABLE_KEYS = frozenset({
    "TRAIN_STEPS", "train.num_steps", "train.num_epochs", "train.log_every", "train.eval_every",
    "train.eval_steps", "train.checkpoint_every", "train.keep_checkpoints",
    "train.async_checkpoints", "train.progress_bar", "train.on_nonfinite",
})

# Bindings that only choose how the same computation is laid out on the devices (sharding,
# rematerialisation, kernels, loss chunking): the parameter tree, the data and the loss are
# unchanged, so a checkpoint restores under new values (Orbax reshards params and optimizer
# state onto the new mesh) and training continues with the same losses up to float rounding.
# Not here, because they change the math or the checkpoint's structure: scan_layers (stacked
# parameter tree), microbatches (per-microbatch dropout RNG), dtype/param_dtype, BATCH_SIZE.
LAYOUT_KEYS = frozenset({
    "MESH_SHAPE", "train.mesh_shape",
    "logical_axis_rules.preset", "logical_axis_rules.overrides",
    "TransformerConfig.remat_policy", "TransformerConfig.attention_impl",
    "CausalLMObjective.loss_chunk_size",
})

_BINDING_START = re.compile(r"^([A-Za-z_][\w./]*)\s*=\s?(.*)$")


def parse_operative_config(text: str) -> dict[str, str]:
    """{binding name: value text} of a gin operative config (comments dropped, multi-line
    values joined)."""
    out: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _BINDING_START.match(line)
        if m and not line[0].isspace():
            key = m.group(1)
            out[key] = m.group(2).strip()
        elif key is not None:
            out[key] += " " + line.strip()
    return {k: re.sub(r"\s+", " ", v) for k, v in out.items()}


def _base_key(key: str) -> str:
    """`scope/module.Configurable.param` -> `Configurable.param` (macros unchanged)."""
    name = key.rsplit("/", 1)[-1]
    return ".".join(name.split(".")[-2:])


def check_resume_config(workdir: str, new_config: str,
                        allowed: Iterable[str] = RESUMABLE_KEYS | LAYOUT_KEYS) -> dict[str, tuple]:
    """Raises ConfigMismatchError if DIR/config.gin exists and differs from `new_config` in a
    binding outside `allowed`. A binding present on one side only counts only when it names
    a configurable the other side also has (the other side then used its default).

    Returns the allowed bindings that changed, {name: (old, new)} ('(unset)' for a side
    without it); changed LAYOUT_KEYS (mesh, sharding rules, remat...) are logged as a warning.
    """
    path = os.path.join(workdir, "config.gin")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        old = parse_operative_config(f.read())
    new = parse_operative_config(new_config)
    allowed = set(allowed)
    scopes_old = {k.rsplit(".", 1)[0] for k in old if "." in k}
    scopes_new = {k.rsplit(".", 1)[0] for k in new if "." in k}
    diffs, changed = [], {}
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key not in old or key not in new:
            scope = key.rsplit(".", 1)[0] if "." in key else None
            other = scopes_old if key not in old else scopes_new
            if scope is not None and scope not in other:
                continue  # that configurable did not run yet on the other side
        if key in allowed or _base_key(key) in allowed:
            changed[key] = (old.get(key, "(unset)"), new.get(key, "(unset)"))
            continue
        diffs.append(f"  {key}: {old.get(key, '(unset)')}  ->  {new.get(key, '(unset)')}")
    if diffs:
        raise ConfigMismatchError(
            f"{workdir} already holds a run with a different configuration ({path}):\n"
            + "\n".join(diffs)
            + "\nOnly TRAIN_STEPS, the logging/eval/checkpoint cadence and layout-only bindings "
            f"({', '.join(sorted(LAYOUT_KEYS))}) may change on resume. "
            "Resume with the same command, or pick a new --workdir.")
    layout = [f"{k}: {a} -> {b}" for k, (a, b) in changed.items() if _base_key(k) in LAYOUT_KEYS]
    if layout:
        logging.warning("resuming %s with a different layout (the checkpoint is resharded onto "
                        "it; the math is unchanged): %s", workdir, "; ".join(layout))
    rest = [f"{k}: {a} -> {b}" for k, (a, b) in changed.items()
            if _base_key(k) not in LAYOUT_KEYS]
    if rest:
        logging.info("resuming %s with changed run length/cadence: %s", workdir, "; ".join(rest))
    return changed


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """What a checkpoint depends on in its tokenizer: size and special-piece ids."""
    names = ("pad", "unk", "bos", "eos", "cls", "sep", "mask")
    return {"vocab_size": int(tokenizer.vocab_size),
            "special_ids": {n: int(getattr(tokenizer, f"{n}_id", -1)) for n in names}}


def check_resume_tokenizer(workdir: str, tokenizer) -> None:
    """Raises ConfigMismatchError if DIR/run.json records a tokenizer whose size or special
    ids differ from `tokenizer` (e.g. VOCAB's file was replaced at the same path)."""
    path = os.path.join(workdir, "run.json")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        old = json.load(f).get("tokenizer")
    new = tokenizer_fingerprint(tokenizer)
    if old is None or old == new:
        return
    diffs = [f"  vocab_size: {old.get('vocab_size')}  ->  {new['vocab_size']}"] \
        if old.get("vocab_size") != new["vocab_size"] else []
    for name, pid in new["special_ids"].items():
        before = old.get("special_ids", {}).get(name)
        if before != pid:
            diffs.append(f"  {name} id: {before}  ->  {pid}")
    raise ConfigMismatchError(
        f"{workdir} was trained with a different tokenizer than VOCAB={getattr(tokenizer, 'path', '?')!r} "
        f"({path}):\n" + "\n".join(diffs) + "\nThe checkpoint's embeddings only fit the "
        "original tokenizer: restore that .model file, or pick a new --workdir.")

# ------------------------------------------------------------------------ gin spelling --------

def _registered() -> dict[str, list[str]]:
    """{configurable name (short and full): parameter names} of every registered configurable."""
    import gin
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


def _gin_texts(files: Sequence[str], search_root: str) -> list[str]:
    """Text of the gin files and (recursively) their includes."""
    texts, seen, todo = [], set(), list(files)
    while todo:
        path = todo.pop()
        if not os.path.exists(path):
            path = os.path.join(search_root, path)
        if path in seen or not os.path.exists(path):
            continue
        seen.add(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        texts.append(text)
        todo += re.findall(r"^\s*include\s+['\"]([^'\"]+)['\"]", text, flags=re.M)
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
        raise ValueError(
            f"--gin.{name}: no macro {name!r} is defined or used by the gin files "
            f"({', '.join(files) or 'none given'}), so it would change nothing."
            f"{_suggest(name, known)} Macros are in the run config (configs/runs/*.gin); "
            "to set a parameter directly use --gin.configurable.parameter=VALUE.")


def explain_gin_error(err: Exception) -> str | None:
    """A better message for gin's unknown-configurable / unknown-parameter errors, or None."""
    text = str(err)
    registry = _registered()
    m = re.search(r"No configurable matching '([^']+)'", text)
    if m:
        return (f"unknown gin configurable {m.group(1)!r}.{_suggest(m.group(1), registry)}\n{text}\n"
                "Registered configurables are listed in research/configurables.py.")
    m = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", text)
    if m:
        name, param = m.groups()
        params = registry.get(name, [])
        return (f"{name} has no parameter {param!r}.{_suggest(param, params)}\n{text}\n"
                f"Its parameters: {', '.join(params) or '(unknown)'}.")
    return None


# ------------------------------------------------------------------------ required values -----

class CheckpointSaveError(ReliabilityError):
    """A checkpoint could not be written (disk full, I/O error); earlier ones are intact."""


class InvalidConfigError(ReliabilityError, TypeError, ValueError):
    """A train() argument (run-config macro) has the wrong type or range."""


# Example values for the "pass --gin.NAME=..." hint of a missing required binding.
_EXAMPLES = {
    "vocab": "\"'path.model'\"", "train_data": "\"'text:data/*.txt'\"",
    "eval_data": "\"'text:data/*.txt'\"", "num_steps": "1000", "batch_size": "16",
    "seq_len": "256", "learning_rate": "6e-4", "model_config": "@TransformerConfig()",
    "objective": "@CausalLMObjective()",
}
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
    example = _EXAMPLES.get(param, "VALUE")
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
    bound; otherwise ValueError naming them all and the macro to set."""
    import gin
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
        macro = _MACROS.get(param)
        # Suggest the macro only if the gin files define it (otherwise the override is refused).
        known = macro and any(re.search(rf"^\s*{macro}\s*=", t, flags=re.M) for t in texts)
        parts.append(_missing_text(f"{name}.{param}", macro if known else None))
    raise ValueError("; ".join(parts) + ".")


def explain_required_runtime(err: Exception) -> str | None:
    """gin's call-time 'Required bindings for `train` not provided' as one helpful line."""
    m = re.search(r"Required bindings for `([\w.]+)` not provided in config: \[([^\]]*)\]", str(err))
    if not m:
        return None
    name = m.group(1)
    params = re.findall(r"'(\w+)'", m.group(2))
    return "; ".join(_missing_text(f"{name}.{p}", None) for p in params) + "."


# ------------------------------------------------------------------------ train() types -------

# The run-config macro of each train() parameter (for messages).
_MACROS = {
    "num_steps": "TRAIN_STEPS", "batch_size": "BATCH_SIZE", "seq_len": "SEQ_LEN",
    "learning_rate": "LEARNING_RATE", "warmup_steps": "WARMUP_STEPS", "seed": "SEED",
    "mesh_shape": "MESH_SHAPE", "train_data": "TRAIN_DATA", "eval_data": "EVAL_DATA",
    "test_data": "TEST_DATA", "vocab": "VOCAB", "num_epochs": "EPOCHS",
    "warmup_fraction": "WARMUP_FRACTION", "init_checkpoint": "INIT_CHECKPOINT",
}


def _is_int(v) -> bool:
    import numbers
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    import numbers
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


_POS_INT = ("a positive int", lambda v: _is_int(v) and v > 0, "16")
_NONNEG_INT = ("a non-negative int", lambda v: _is_int(v) and v >= 0, "0")
_POS_NUM = ("a positive number", lambda v: _is_number(v) and v > 0 and v == v and v != float("inf"), "6e-4")
_STR = ("a string", lambda v: isinstance(v, str), "\"'...'\"")


def _or_none(rule):
    desc, ok, ex = rule
    return (desc + " or None", lambda v: v is None or ok(v), ex)


_TRAIN_RULES = {
    "num_steps": _or_none(_POS_INT),
    "batch_size": _POS_INT,
    "seq_len": _POS_INT,
    "learning_rate": _POS_NUM,
    "warmup_steps": _or_none(_NONNEG_INT),
    "warmup_fraction": ("a number in [0, 1] or None",
                        lambda v: v is None or (_is_number(v) and 0 <= v <= 1), "0.1"),
    "num_epochs": _or_none(_POS_NUM),
    "seed": ("an int", _is_int, "0"),
    "mesh_shape": ("a dict of axis name to int (or None)",
                   lambda v: v is None or (isinstance(v, dict) and all(
                       isinstance(k, str) and _is_int(n) for k, n in v.items())),
                   "\"{'data': -1}\""),
    "train_data": _STR,
    "eval_data": _or_none(_STR),
    "test_data": _or_none(_STR),
    "vocab": _or_none(_STR),
    "init_checkpoint": _or_none(_STR),
    "best_metric": _or_none(_STR),
    "microbatches": _POS_INT,
    "log_every": _POS_INT,
    "eval_every": _or_none(_POS_INT),
    "eval_steps": _or_none(_POS_INT),
    "checkpoint_every": _POS_INT,
    "keep_checkpoints": _or_none(_POS_INT),
    "async_checkpoints": ("a bool (True/False)", lambda v: isinstance(v, bool), "True"),
    "progress_bar": ("a bool (True/False)", lambda v: isinstance(v, bool), "True"),
}


def validate_train_args(args: dict[str, Any]) -> None:
    """TypeError/ValueError naming every train() argument of the wrong type or range: the
    macro, the value, its type, what is expected and an example override."""
    problems = []
    for param, (desc, ok, example) in _TRAIN_RULES.items():
        if param not in args or ok(args[param]):
            continue
        value = args[param]
        macro = _MACROS.get(param)
        where = f"{macro} (train.{param})" if macro else f"train.{param}"
        flag = f"--gin.{macro or 'train.' + param}={_EXAMPLES.get(param, example)}"
        problems.append(f"{where} = {value!r} ({type(value).__name__}) must be {desc}; "
                        f"fix it in the run config or pass e.g. {flag}")
    if problems:
        raise InvalidConfigError("invalid train() arguments: " + "; ".join(problems) + ".")
