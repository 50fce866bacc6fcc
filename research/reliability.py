"""Keeping work safe: preemption signals, the workdir lock, the resume-config check, and
helpful errors for misspelled gin bindings.

* `PreemptionGuard`: SIGTERM/SIGINT during `train` ask the loop to finish its step, save a
  checkpoint and exit cleanly (a second signal stops at once, without a checkpoint).
* `WorkdirLock`: DIR/.lock (fcntl.flock, held by process 0) so two runs never train into one DIR.
* `check_resume_config`: a DIR that already has a config.gin only resumes with the same
  bindings (run length, logging/eval/checkpoint cadence and the progress bar may change).
* `check_gin_bindings` / `explain_gin_error`: unknown configurables, parameters and macros name
  their closest registered spelling.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
import shlex
import signal
import socket
import sys
import threading
from typing import Iterable, Sequence


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


def check_resume_config(workdir: str, new_config: str,
                        allowed: Iterable[str] = RESUMABLE_KEYS) -> None:
    """Raises ConfigMismatchError if DIR/config.gin exists and differs from `new_config` in a
    binding outside `allowed`. A binding present on one side only counts only when it names
    a configurable the other side also has (the other side then used its default)."""
    path = os.path.join(workdir, "config.gin")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        old = parse_operative_config(f.read())
    new = parse_operative_config(new_config)
    allowed = set(allowed)
    scopes_old = {k.rsplit(".", 1)[0] for k in old if "." in k}
    scopes_new = {k.rsplit(".", 1)[0] for k in new if "." in k}
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key in allowed or old.get(key) == new.get(key):
            continue
        if key not in old or key not in new:
            scope = key.rsplit(".", 1)[0] if "." in key else None
            other = scopes_old if key not in old else scopes_new
            if scope is not None and scope not in other:
                continue  # that configurable did not run yet on the other side
        diffs.append(f"  {key}: {old.get(key, '(unset)')}  ->  {new.get(key, '(unset)')}")
    if diffs:
        raise ConfigMismatchError(
            f"{workdir} already holds a run with a different configuration ({path}):\n"
            + "\n".join(diffs)
            + "\nOnly TRAIN_STEPS and the logging/eval/checkpoint cadence may change on resume. "
            "Resume with the same command, or pick a new --workdir.")


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
