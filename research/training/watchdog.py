"""The hang watchdog: a run whose step, eval, checkpoint save/restore or cross-process sync
stops making progress dumps its stacks and exits, so that its scheduler (or research.sweep)
restarts it and it resumes from the last checkpoint, instead of burning its reservation.

A daemon thread holds a deadline per blocking phase of the training loop
(`with watchdog.phase("eval", step): ...`) and per train step in flight
(`begin_step(step)` before the batch is read and the step dispatched, `end_step(outputs)`
after; a second daemon thread waits for the outputs to be ready, so the step counts as done
when the device finishes it, without syncing the main thread). When a deadline passes,
every process of the run, each on its own:

  1. writes DIR/hang-<process index>-<step>.txt: the phase, the step and the time it ran,
     then the Python stacks of all its threads (faulthandler.dump_traceback). Native (C++)
     stacks are not available from Python: for a hang inside XLA the Python stack ends at the
     jitted call (e.g. `train_step`); attach `py-spy dump --native --pid PID` or gdb to see
     further;
  2. prints one `error:` line to stderr naming the phase, the step and that file;
  3. exits with `errors.HangError.exit_code` (75) through os._exit: the main thread is stuck
     inside XLA and cannot raise, so nothing is cleaned up. The last complete checkpoint is
     intact (Orbax commits a step atomically) and re-running the same command resumes there.

The limit (`train.hang_timeout_s`):
  a number      seconds allowed to each phase and each train step;
  None/'auto'   the larger of AUTO_MIN_S (10 min) and STEP_MULTIPLE (50) x the median train
                step time of this process, measured after its first COMPILE_STEPS (3) steps;
                an eval gets `scale` (its batch count) times that. Until MIN_SAMPLES steps
                were measured every phase gets COMPILE_ALLOWANCE_S (30 min).
Whatever the limit, a process's first COMPILE_STEPS train steps (the first compiles; the next
may recompile for other input layouts, e.g. after a restore), and the first run of a phase
marked `compiles=True` (its first eval, the state initialisation), get at least
COMPILE_ALLOWANCE_S: compiling a big model can take many minutes and must never trip it.

Test hook: RESEARCH_TEST_SLEEP_AT_STEP=K:SECONDS makes `begin_step(K)` sleep SECONDS inside
the armed step (a step that hangs on purpose; tests/test_watchdog.py). Unset in real runs.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import os
import socket
import statistics
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

from research import storage
from research.errors import HangError

AUTO_MIN_S = 600.0
STEP_MULTIPLE = 50.0
COMPILE_ALLOWANCE_S = 1800.0
MIN_SAMPLES = 5
COMPILE_STEPS = 3
SAMPLE_WINDOW = 1000  # the median is over the last SAMPLE_WINDOW measured steps
TEST_SLEEP_ENV = "RESEARCH_TEST_SLEEP_AT_STEP"
TRAIN_STEP = "train step"


UPLOAD_TIMEOUT_S = 30.0


def _upload_within(local: str, path: str, timeout_s: float) -> str:
    """Copies the stacks file to object storage in a daemon thread, waiting at most
    `timeout_s` (storage itself may be what hangs); says where the stacks are."""
    failed: list[BaseException] = []

    def copy() -> None:
        try:
            storage.upload(local, path)
        except BaseException as err:  # noqa: BLE001 - reported in the error line
            failed.append(err)

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive() or failed:
        why = f"{failed[0]}" if failed else f"no answer in {timeout_s:g}s"
        return f"Python stacks of all threads in {local} (copying them to {path} failed: {why})"
    return f"Python stacks of all threads in {path}"


def hang_file(directory: str, host: int, step: int) -> str:
    """DIR/hang-<host>-<step>.txt: where process `host` writes its stacks for a hang in `step`."""
    return storage.join(directory, f"hang-{host}-{step}.txt")


def _stderr_line(text: str) -> None:
    """Writes one line to fd 2 directly: sys.stderr's lock may be held by the stuck thread."""
    os.write(2, (text.rstrip("\n") + "\n").encode(errors="replace"))


def _test_sleep(step: int) -> None:
    """The RESEARCH_TEST_SLEEP_AT_STEP=K:SECONDS test hook: sleeps SECONDS in step K."""
    spec = os.environ.get(TEST_SLEEP_ENV)
    if spec:
        at, seconds = spec.split(":")
        if int(at) == step:
            time.sleep(float(seconds))


class Watchdog:
    """Deadlines for the blocking phases of one training process (see the module docstring).

    `timeout_s`: train.hang_timeout_s (seconds, or None/'auto'). `directory`: where the
    hang-*.txt files go (the run's DIR). `host`: this process's index. `clock`, `exit_fn`,
    `error_fn`, `wait_fn` (blocks until a step's outputs are ready: jax.block_until_ready)
    and `poll_s` are injectable for tests.
    """

    def __init__(self, directory: str, timeout_s: float | str | None, *, host: int = 0,
                 clock: Callable[[], float] = time.monotonic,
                 exit_fn: Callable[[int], Any] = os._exit,
                 error_fn: Callable[[str], None] = _stderr_line,
                 wait_fn: Callable[[Any], Any] | None = None, poll_s: float = 1.0):
        self.directory, self.host = directory, host
        self.timeout_s = None if timeout_s in (None, "auto") else float(timeout_s)
        self.clock, self.exit_fn, self.error_fn, self.poll_s = clock, exit_fn, error_fn, poll_s
        self.wait_fn = wait_fn
        self.fired: str | None = None  # the hang file, once fired
        self._lock = threading.Condition()
        self._phases: dict[int, tuple[str, int, float, float]] = {}  # id: name, step, start, limit
        self._next_id = 0
        self._seen: set[str] = set()
        self._steps: collections.deque = collections.deque()  # [step, outputs, dispatched]
        self._head_start: float | None = None  # when the oldest step in flight began running
        self._step_times: collections.deque = collections.deque(maxlen=SAMPLE_WINDOW)
        self.steps_done = 0
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=self._monitor, name="hang-watchdog", daemon=True),
                         threading.Thread(target=self._waiter, name="hang-watchdog-steps",
                                          daemon=True)]
        for thread in self._threads:
            thread.start()

    def __enter__(self) -> "Watchdog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stops both threads (steps still in flight are no longer watched)."""
        self._closed.set()
        with self._lock:
            self._lock.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=1)

    # ---- the limits ---------------------------------------------------------------------
    def median_step_s(self) -> float | None:
        """The median train step time after the first COMPILE_STEPS, from MIN_SAMPLES on."""
        with self._lock:
            times = list(self._step_times)
        return statistics.median(times) if len(times) >= MIN_SAMPLES else None

    def limit(self, name: str, *, compiles: bool = False, scale: float = 1.0) -> float:
        """Seconds phase `name` may run now; `compiles`: its first run compiles (allowance)."""
        if self.timeout_s is not None:
            limit = self.timeout_s
        else:
            median = self.median_step_s()
            limit = (COMPILE_ALLOWANCE_S if median is None
                     else max(AUTO_MIN_S, STEP_MULTIPLE * median * max(scale, 1.0)))
        if compiles and name not in self._seen:
            limit = max(limit, COMPILE_ALLOWANCE_S)
        return limit

    # ---- phases -------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str, step: int, *, compiles: bool = False,
              scale: float = 1.0) -> Iterator[None]:
        """Arms a deadline for the block (named `name`, at `step`); disarms it on exit."""
        limit = self.limit(name, compiles=compiles, scale=scale)
        with self._lock:
            self._seen.add(name)
            key, self._next_id = self._next_id, self._next_id + 1
            self._phases[key] = (name, step, self.clock(), limit)
        try:
            yield
        finally:
            with self._lock:
                del self._phases[key]

    def begin_step(self, step: int) -> None:
        """Step `step` (1-based, as in metrics.jsonl) starts: reading its batch, dispatching."""
        with self._lock:
            now = self.clock()
            self._steps.append([step, None, now])
            if len(self._steps) == 1:
                self._head_start = now
        _test_sleep(step)

    def end_step(self, outputs: Any) -> None:
        """The step begun last was dispatched; it is done when `outputs` are ready."""
        with self._lock:
            self._steps[-1][1] = outputs
            self._lock.notify_all()

    def _waiter(self) -> None:
        """Waits for the steps in flight and records their times. Steps finish in order, so
        it waits for the newest dispatched one and retires all up to it at once (one wake-up
        for a backlog: little contention with a main thread that runs ahead); each of them is
        counted at the batch's mean time."""
        wait = self.wait_fn
        if wait is None:
            import jax
            wait = jax.block_until_ready
        while True:
            with self._lock:
                while not self._closed.is_set() and not (self._steps and
                                                         self._steps[0][1] is not None):
                    self._lock.wait()
                if self._closed.is_set():
                    return
                count = sum(1 for entry in self._steps if entry[1] is not None)
                outputs = self._steps[count - 1][1]
            try:
                wait(outputs)
            except Exception:  # noqa: BLE001 - a step that failed is not a hang; the main
                pass  # thread reports its error when it fetches the outputs
            with self._lock:
                now = self.clock()
                for _ in range(count):
                    self._steps.popleft()
                    if self.steps_done >= COMPILE_STEPS:
                        self._step_times.append((now - self._head_start) / count)
                    self.steps_done += 1
                self._head_start = max(self._steps[0][2], now) if self._steps else None

    # ---- firing -------------------------------------------------------------------------
    def _overdue(self) -> tuple[str, int, float, float] | None:
        """(phase, step, seconds it ran, its limit) of a phase or step past its deadline."""
        now = self.clock()
        with self._lock:
            running = list(self._phases.values())
            if self._steps:
                limit = self.limit(TRAIN_STEP, compiles=self.steps_done < COMPILE_STEPS)
                running.append((TRAIN_STEP, self._steps[0][0], self._head_start, limit))
        for name, step, start, limit in running:
            if now - start > limit:
                return name, step, now - start, limit
        return None

    def _monitor(self) -> None:
        while not self._closed.wait(self.poll_s):
            overdue = self._overdue()
            if overdue is not None:
                self.fire(*overdue)
                return

    def fire(self, name: str, step: int, elapsed: float, limit: float) -> None:
        """Writes the stacks file, prints the `error:` line and exits (see the module doc)."""
        path = hang_file(self.directory, self.host, step)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        # faulthandler needs a real file: on object storage the stacks go to a local file first.
        local = (os.path.join(tempfile.gettempdir(), os.path.basename(path))
                 if storage.is_remote(path) else path)
        try:
            with open(local, "w", encoding="utf-8") as f:
                f.write(f"hang: {name} of step {step} ran {elapsed:.1f}s, past its {limit:g}s "
                        f"limit (train.hang_timeout_s); process {self.host}, pid {os.getpid()}, "
                        f"host {socket.gethostname()}, {stamp}\n"
                        "Python stacks of all threads (native stacks are not available from "
                        "Python), most recent call first:\n\n")
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
            if local != path:
                where = _upload_within(local, path, UPLOAD_TIMEOUT_S)
            else:
                where = f"Python stacks of all threads in {path}"
        except OSError as err:
            where = f"could not write {path} ({err.strerror or err})"
        self.fired = path
        err = HangError(
            f"hang: the {name} of step {step} ran {elapsed:.1f}s, past its {limit:g}s limit "
            f"(train.hang_timeout_s); {where}. Exiting with code {HangError.exit_code}: re-run "
            "the same command to resume from the last checkpoint (raise "
            "--gin.train.hang_timeout_s if this phase is only slow).")
        self.error_fn(f"error: {err}")
        self.exit_fn(HangError.exit_code)
