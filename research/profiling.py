"""A jax.profiler trace of a window of training steps: `--profile_steps=N:M` on
`python -m research.train` (into DIR/profile) and `python -m research.benchmark` (into
--profile_dir, over the timed steps).

`N:M` traces the M - N steps that take the step counter from N to M: the steps with 0-based
index N..M-1 (half-open [N, M)), i.e. the ones after the first N. In research.train the counter
is the loop's (a resumed run starts at its checkpoint's step), so `10:15` traces the updates
logged as steps 11..15 in metrics.jsonl; in research.benchmark it counts the timed steps (after
compilation and warm-up), so `0:2` traces the first two timed steps.

Before the trace starts, the steps before the window are waited on, and the window's last step
is waited on (its outputs blocked on) before the trace stops, so the trace holds the window's
device work. The trace is a TensorBoard profile run, DIR/plugins/profile/<timestamp>/
<host>.xplane.pb (one file per host): view it with `tensorboard --logdir DIR` (with the
tensorboard-plugin-profile package) or `xprof --logdir=DIR` (XProf; trace viewer, op profile).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import tempfile
from typing import Any, Callable

from research import storage
from research.errors import ConfigError

Window = tuple[int, int]  # (N, M): the steps N..M-1 (0-based), half-open

_USAGE = ("expected N:M with integers 0 <= N < M, e.g. --profile_steps=10:15 (traces the 5 steps "
          "after the first 10)")


def parse_steps(text: str) -> Window:
    """argparse `type` of --profile_steps: 'N:M' -> (N, M) with 0 <= N < M; anything else is an
    argparse error (exit 2, one `error:` line naming the value and the expected form)."""
    parts = text.split(":")
    try:
        start, stop = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        start = stop = None
    if start is None or stop is None or start < 0 or stop <= start:
        raise argparse.ArgumentTypeError(f"{text!r}: {_USAGE}")
    return start, stop


def check_window(window: Window | None, num_steps: int, what: str) -> None:
    """ConfigError when the window reaches past the `num_steps` steps the run has (`what` says
    which setting sets them, e.g. '--steps=5'), before anything is compiled."""
    if window is not None and window[1] > num_steps:
        raise ConfigError(f"--profile_steps={window[0]}:{window[1]} reaches past the run's "
                          f"{num_steps} steps ({what}); pick N:M with M <= {num_steps}.")


class StepProfiler:
    """Traces the steps of `window` (None: nothing) into `log_dir`.

    In the loop: `before(step, live)` ahead of step `step` (0-based: the steps done before it)
    and `after(step, outputs)` once it is dispatched; `live`/`outputs` are the arrays to wait
    on (the state, the step's metrics). `close()` (e.g. from an ExitStack) stops a trace the
    loop left early (an error, a preemption). A window entered part-way (a resumed run) is
    traced from its first step the loop runs. `announce` (e.g. print, logging.info; None: say
    nothing) gets one line saying where the trace went.
    """

    def __init__(self, window: Window | None, log_dir: str, *,
                 announce: Callable[[str], Any] | None = print):
        self.window, self.log_dir, self.announce = window, log_dir, announce
        self.first: int | None = None  # the first traced step, once the trace has started
        self.last: int | None = None  # the step counter after the last traced step
        self.active = False
        self._local_dir: str | None = None  # where a trace for an object-store log_dir goes first

    def before(self, step: int, live: Any) -> None:
        if self.window is None or self.active or self.first is not None:
            return
        if self.window[0] <= step < self.window[1]:
            import jax
            jax.block_until_ready(live)  # earlier steps' device work stays out of the trace
            if storage.is_remote(self.log_dir):  # traced locally, copied there on stop
                self._local_dir = tempfile.mkdtemp(prefix="research-profile-")
            else:
                os.makedirs(self.log_dir, exist_ok=True)
            jax.profiler.start_trace(self._local_dir or self.log_dir)
            self.active, self.first = True, step

    def after(self, step: int, outputs: Any) -> None:
        if not self.active:
            return
        self.last = step + 1
        if self.last >= self.window[1]:
            import jax
            jax.block_until_ready(outputs)
            self._stop()

    def close(self) -> None:
        if self.active:
            self._stop()
        elif self.window is not None and self.first is None and self.announce:
            self.announce(f"profile: no step of --profile_steps={self.window[0]}:"
                          f"{self.window[1]} ran (the run started past it); nothing traced.")

    def _stop(self) -> None:
        import jax
        jax.profiler.stop_trace()
        self.active = False
        where = trace_files(self._local_dir or self.log_dir)
        if self._local_dir:
            storage.upload(self._local_dir, self.log_dir)
            where = [storage.join(self.log_dir, os.path.relpath(f, self._local_dir)) for f in where]
            shutil.rmtree(self._local_dir, ignore_errors=True)
            self._local_dir = None
        if not self.announce:
            return
        first = self.first
        last = self.last if self.last is not None else first  # stopped inside its first step
        early = "" if last == self.window[1] else f" (stopped early; asked for {self.window[1]})"
        shown = storage.dirname(where[-1]) if where else self.log_dir
        msg = (f"profile: steps {first}:{last}{early} traced to {shown}; view with "
               f"`tensorboard --logdir {self.log_dir}` (profile plugin) or "
               f"`xprof --logdir={self.log_dir}`; kernel table: "
               f"`python -m research.trace_summary {self.log_dir}`")
        self.announce(msg)


def trace_files(log_dir: str) -> list[str]:
    """The *.xplane.pb files under `log_dir` (a --profile_steps trace directory), oldest first."""
    files = glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.xplane.pb"))
    return sorted(files, key=os.path.getmtime)
