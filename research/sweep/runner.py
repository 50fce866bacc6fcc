"""Runs a sweep's trials: plans each trial from what is on disk, runs (local, tpu-vm) or submits
(slurm) the ones that need it, handles Ctrl-C, and prints progress and a summary. Writes
ROOT/sweep.json; each trial's trial.json through `trial_state`.

Per trial, on every `run`: done (final.json exists) -> skipped; failed (with its reason, e.g.
`hang` for a run the training watchdog stopped: trial_state.failure_reason) -> reported, rerun
only with --retry_failed; pending, interrupted, or "running" from a sweep that died -> run again
(research.train resumes from its checkpoints); running in another live process or submitted
to SLURM and still queued -> left alone. Ctrl-C / SIGTERM forward one SIGTERM to the running
trials (they checkpoint and exit), which are then marked interrupted.

ROOT may be local or on object storage (`--root=gs://bucket/sweep`): every file goes through
research/storage.py, the sweep's lock is then a lease object (research/lease.py) instead of an
flock, and train.log is staged locally and copied up (trial_log.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import IO, Any, Iterator, Sequence

from research import lease as lease_lib
from research import storage, workdir
from research.sweep import trial_log
from research.sweep.expansion import expand, sweep_json
from research.sweep.gin_values import to_json
from research.sweep.launchers import Launcher, SlurmLauncher
from research.sweep.spec import SweepError, SweepSpec, Trial
from research.sweep.trial_state import (LOG_FILE, STATUS_ORDER, effective_status, ended,
                                        new_state, read_state, returncode_text, tail, write_json,
                                        write_state)
from research.sweep.values import fmt_duration

# (trial, trial.json or None, action: skip | failed | inflight | run, note)
PlanEntry = tuple[Trial, "dict[str, Any] | None", str, str]


def git_info(cwd: str) -> tuple[str | None, bool | None]:
    """(HEAD commit, dirty) of the git repository at cwd; (None, None) outside git."""
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout if proc.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = git("status", "--porcelain")
    return commit.strip(), (bool(status.strip()) if status is not None else None)


class SweepLock:
    """One `run` per sweep root at a time: an exclusive flock on ROOT/.sweep.lock, or with ROOT
    on object storage (no flock there) a heartbeat lease object ROOT/.sweep.lock
    (research/lease.py; a killed sweep's lease is taken over once its heartbeat is older than
    its ttl). A second `run` is refused with a SweepError / WorkdirLockedError."""

    def __init__(self, root: str):
        self.path = storage.join(root, ".sweep.lock")
        self.fd: int | None = None
        self.lease = (lease_lib.Lease(self.path, what="sweep") if storage.is_remote(root)
                      else None)

    @property
    def lost(self) -> bool:
        """Whether another sweep took over this one's lease (object storage only)."""
        return self.lease is not None and self.lease.lost

    def check(self) -> None:
        """WorkdirLockedError when the lease was lost."""
        if self.lease is not None:
            self.lease.check()

    def __enter__(self) -> "SweepLock":
        if self.lease is not None:
            self.lease.acquire()
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SweepError(f"another `research.sweep run` is using {os.path.dirname(self.path)} "
                             f"({holder}); wait for it to finish or stop it first.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.lease is not None:
            self.lease.release()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Runner:
    """Runs (or submits) the trials of one sweep under one launcher."""

    def __init__(self, spec: SweepSpec, launcher: Launcher, root: str, *, parallel: int = 1,
                 retry_failed: bool = False, out: IO[str] | None = None):
        if parallel < 1:
            raise SweepError(f"--parallel={parallel}: give at least 1 concurrent trial.")
        self.spec = spec
        self.launcher = launcher
        self.root = storage.resolve(root)
        self.parallel = parallel
        self.retry_failed = retry_failed
        self.out = out or sys.stdout
        self.trials = expand(spec, self.root)
        self._lock = threading.RLock()
        self._running: dict[str, tuple[Trial, Any]] = {}
        self.stop_signal: int | None = None
        self._signals = 0
        self._handled = 0
        self._durations: list[float] = []
        self._to_run = 0
        self._finished_runs = 0
        self.results: dict[str, tuple[str, dict[str, Any] | None]] = {}
        self._sweep_lock: SweepLock | None = None
        self._logs: dict[str, trial_log.TrialLog] = {}

    # ---- output -----------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """Prints one line of progress (thread-safe)."""
        with self._lock:
            print(text, file=self.out, flush=True)

    def _count(self) -> str:
        """`[k/N]`: the next handled trial's ordinal."""
        self._handled += 1
        return f"[{self._handled}/{len(self.trials)}]"

    def trial_dir(self, trial: Trial) -> str:
        """ROOT/<trial>: research.train's --workdir for the trial."""
        return storage.join(self.root, trial.name)

    # ---- planning ---------------------------------------------------------------------------
    def plan(self, *, write: bool) -> list[PlanEntry]:
        """(trial, state, action, note) per trial; action is skip | failed | inflight | run.
        With `write`, trial.json files are brought up to date (and created as pending)."""
        plan = []
        for trial in self.trials:
            tdir = self.trial_dir(trial)
            state = read_state(tdir)
            status, updates, note = effective_status(tdir, state)
            if state is None and (write or status == "done"):
                state = new_state(trial, self.launcher)
            if state is not None:
                state.update(updates)
                state["status"] = status
            if write and state is not None:
                storage.makedirs(tdir)
                write_state(tdir, state)
            if status == "done":
                action = "skip"
            elif status == "failed" and not self.retry_failed:
                action = "failed"
            elif status in ("running", "submitted"):
                action = "inflight"
            else:
                action = "run"
            plan.append((trial, state, action, note))
        return plan

    def dry_run(self) -> int:
        """Prints what `run` would do, touching nothing on disk."""
        plan = self.plan(write=False)
        runnable = sum(1 for p in plan if p[2] == "run")
        self.say(f"# research.sweep run --dry_run: {len(self.trials)} trials in {self.root}, "
                 f"launcher {self.launcher.name}, {runnable} to run")
        devices = self.launcher.devices_per_trial
        if devices is not None:
            self.say(f"# CUDA_VISIBLE_DEVICES: {self.parallel} slots of {devices} GPUs; a trial "
                     "takes a free slot (shown as if trials finish in order)")
        ordinal = 0
        for i, (trial, state, action, note) in enumerate(plan, 1):
            head = f"# [{i}/{len(plan)}] {trial.name}"
            if action == "skip":
                self.say(f"{head}: done, skipped")
            elif action == "failed":
                self.say(f"{head}: failed ({returncode_text(state)}), not rerun "
                         "without --retry_failed")
            elif action == "inflight":
                self.say(f"{head}: {state.get('status')} ({note}), left alone")
            else:
                attempt = (state or {}).get("attempts", 0) + 1
                slot = ordinal % self.parallel
                ordinal += 1
                self.say(head)
                self.say(self.launcher.dry_run(trial, attempt, slot))
        return 0

    # ---- running ----------------------------------------------------------------------------
    def run(self) -> int:
        """Writes sweep.json, runs or submits what needs it, prints a summary; exit code."""
        if storage.is_remote(self.root):
            storage.check_writable(self.root, "--root")
        storage.makedirs(self.root)
        with SweepLock(self.root) as self._sweep_lock:
            write_json(storage.join(self.root, "sweep.json"),
                       sweep_json(self.spec, self.trials, self.root))
            self.git_commit, self.git_dirty = git_info(self.launcher.cwd)
            plan = self.plan(write=True)
            todo = []
            for trial, state, action, note in plan:
                if action == "run":
                    todo.append((trial, state))
                    continue
                self.results[trial.name] = (state["status"], state)
                label = {"skip": "skip", "failed": "failed", "inflight": state["status"]}[action]
                extra = {"skip": "(done)",
                         "failed": f"({returncode_text(state)}; --retry_failed reruns it)",
                         "inflight": f"({note})"}[action]
                self.say(f"{self._count()} {label} {trial.name} {extra}")
            self._to_run = len(todo)
            with self._signal_handlers():
                if self.launcher.synchronous:
                    self._run_pool(todo)
                else:
                    self._submit_all(todo)
            code = self.summary()
            self._sweep_lock.check()
            return code

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        """SIGINT/SIGTERM go to _on_signal while trials run (main thread only)."""
        old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, self._on_signal)
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        """First signal: SIGTERM to running trials (checkpoint and exit), start nothing new.
        Again: forward once more (research.train then stops at once, without saving)."""
        with self._lock:
            self._signals += 1
            if self.stop_signal is None:
                self.stop_signal = signum
            running = list(self._running.values())
            again = self._signals > 1
            name = signal.Signals(signum).name
            for trial, proc in running:
                self.launcher.stop(trial, proc, again)
            if again:
                message = f"received {name} again: stopping {len(running)} trial(s) at once"
            else:
                message = (f"received {name}: asking {len(running)} running trial(s) to save a "
                           "checkpoint and exit; starting no new ones (again to stop at once)")
            try:
                self.say(message)
            except RuntimeError:  # the signal interrupted a print of the main thread
                pass

    def _run_pool(self, todo: Sequence[tuple[Trial, dict[str, Any]]]) -> None:
        """Runs synchronous trials, `parallel` at a time, each with a free device slot."""
        slots: queue.Queue[int] = queue.Queue()
        for slot in range(self.parallel):
            slots.put(slot)
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.parallel) as pool:
            pending = {pool.submit(self._run_one, trial, state, slots) for trial, state in todo}
            while pending:
                _, pending = concurrent.futures.wait(pending, timeout=0.2)

    def _run_one(self, trial: Trial, state: dict[str, Any], slots: queue.Queue) -> None:
        """One attempt of one trial, start to finish, with trial.json kept current."""
        slot = slots.get()
        try:
            self._attempt(trial, state, slot)
        except Exception:  # a launcher bug must not hang the sweep: record it as a failure
            text = traceback.format_exc()
            self._append_log(trial, text)
            state.update(status="failed", finished_at=time.time())
            self._save(trial, state)
            self._finish_line(trial, state, 0.0)
        finally:
            log = self._logs.pop(trial.name, None)
            if log is not None:
                log.close()
            slots.put(slot)

    def _attempt(self, trial: Trial, state: dict[str, Any], slot: int) -> None:
        """Starts the trial on `slot`, waits for it, and records how it ended: done
        (final.json), interrupted (exit 0 without it, or stopped by a signal) or failed."""
        tdir = self.trial_dir(trial)
        storage.makedirs(tdir)
        with self._lock:
            if self.stop_signal is not None or self._sweep_lock.lost:
                self.results[trial.name] = (state["status"], state)
                return
            self._prepare(trial, state)
            log = self._logs[trial.name] = trial_log.TrialLog(self.root, trial.name)
            log.write(self._header(trial, state))
            began = time.monotonic()
            try:
                proc = self.launcher.start(trial, log.open(), slot)
            except OSError as err:
                log.write(f"=== research.sweep: could not start the trial: {err}\n")
                self._logs.pop(trial.name).close()
                state.update(ended("failed", 127), finished_at=time.time())
                self._save(trial, state)
                self._finish_line(trial, state, 0.0)
                return
            state["pid"] = proc.pid
            self._running[trial.name] = (trial, proc)
        self._save(trial, state)
        devices = self.launcher.devices(slot)
        where = f", CUDA_VISIBLE_DEVICES={devices}" if devices is not None else ""
        self.say(f"start {trial.name} (attempt {state['attempts']}{where}) -> {log.url}")
        rc = self._wait(proc, log)
        elapsed = time.monotonic() - began
        with self._lock:
            self._running.pop(trial.name, None)
            stopped = self.stop_signal is not None
        self._logs.pop(trial.name).close()
        if workdir.is_finished(tdir):
            status = "done"
        elif rc == 0 or stopped:
            status = "interrupted"
        else:
            status = "failed"
        state.update(ended(status, rc), finished_at=time.time(),
                     wall_time_s=round(float(state.get("wall_time_s") or 0.0) + elapsed, 3))
        self._save(trial, state)
        self._finish_line(trial, state, elapsed)

    @staticmethod
    def _wait(proc: subprocess.Popen, log: trial_log.TrialLog) -> int:
        """proc's exit code; meanwhile a staged log is copied up every log.sync_every s."""
        while True:
            try:
                return proc.wait(timeout=log.sync_every)
            except subprocess.TimeoutExpired:
                log.sync()

    def _prepare(self, trial: Trial, state: dict[str, Any]) -> None:
        """State at the start of an attempt."""
        state.update(name=trial.name, params=to_json(trial.params),
                     command=self.launcher.train_command(trial), launcher=self.launcher.name,
                     status="running", attempts=int(state.get("attempts") or 0) + 1,
                     returncode=None, reason=None, started_at=time.time(), finished_at=None,
                     git_commit=self.git_commit, git_dirty=self.git_dirty,
                     host=socket.gethostname(), log=LOG_FILE)
        launch = self.launcher.launch_command(trial)
        if launch is not None:
            state["launch_command"] = launch
        state.pop("job_id", None)

    def _header(self, trial: Trial, state: dict[str, Any]) -> str:
        """The train.log line that opens an attempt."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state["started_at"]))
        command = state.get("launch_command") or state["command"]
        return (f"=== research.sweep: trial {trial.name}, attempt {state['attempts']}, launcher "
                f"{self.launcher.name}, {stamp}: {shlex.join(command)}\n")

    def _append_log(self, trial: Trial, text: str) -> None:
        """Appends `text` (one line or more) to the trial's train.log."""
        log = self._logs.get(trial.name)
        if log is not None:  # the attempt's log is open: write there (closed by _run_one)
            log.write(text)
        else:
            trial_log.append(self.root, trial.name, text)

    def _save(self, trial: Trial, state: dict[str, Any]) -> None:
        """Writes the trial's trial.json."""
        write_state(self.trial_dir(trial), state)

    def _finish_line(self, trial: Trial, state: dict[str, Any], elapsed: float) -> None:
        """`[3/12] done NAME in 41.2s (ETA 5m10s)`, and the result recorded."""
        with self._lock:
            self.results[trial.name] = (state["status"], state)
            self._finished_runs += 1
            self._durations.append(elapsed)
            remaining = self._to_run - self._finished_runs
            eta = ""
            if remaining > 0 and self.stop_signal is None:
                mean = sum(self._durations) / len(self._durations)
                eta = f" (ETA {fmt_duration(mean * remaining / min(self.parallel, remaining))})"
            rc = f", {returncode_text(state)}" if state["status"] == "failed" else ""
            self.say(f"{self._count()} {state['status']} {trial.name} in "
                     f"{fmt_duration(elapsed)}{rc}{eta}")

    def _submit_all(self, todo: Sequence[tuple[Trial, dict[str, Any]]]) -> None:
        """SLURM: one sbatch per trial; the jobs report back through their returncode files."""
        assert isinstance(self.launcher, SlurmLauncher)
        for trial, state in todo:
            if self.stop_signal is not None:
                self.results[trial.name] = (state["status"], state)
                continue
            tdir = self.trial_dir(trial)
            storage.makedirs(tdir)
            self._prepare(trial, state)
            state.pop("pid", None)
            rc, answer = self.launcher.submit(trial, state["attempts"])
            if rc == 0:
                state.update(status="submitted", job_id=answer)
                self.say(f"{self._count()} submitted {trial.name} (slurm job {answer})")
            else:
                self._append_log(trial, f"=== research.sweep: sbatch failed (exit {rc}): {answer}")
                state.update(ended("failed", rc), finished_at=time.time())
                self.say(f"{self._count()} failed {trial.name}: sbatch exit {rc}: {answer}")
            self._save(trial, state)
            self.results[trial.name] = (state["status"], state)

    # ---- summary ----------------------------------------------------------------------------
    def summary(self) -> int:
        """Counts per status, the failed trials' log tails, and the exit code."""
        counts: dict[str, int] = {}
        for status, _ in self.results.values():
            counts[status] = counts.get(status, 0) + 1
        parts = [f"{counts[s]} {s}" for s in STATUS_ORDER if counts.get(s)]
        self.say(f"\nsweep {self.root}: {len(self.trials)} trials: {', '.join(parts)}")
        for trial in self.trials:
            status, state = self.results.get(trial.name, ("pending", None))
            if status != "failed":
                continue
            log = storage.join(self.trial_dir(trial), LOG_FILE)
            self.say(f"\nFAILED {trial.name}: {returncode_text(state or {})}, log {log}")
            for line in tail(log):
                self.say(f"    | {line}")
        if counts.get("failed"):
            self.say("\nre-run with --retry_failed to run the failed trials again.")
        if counts.get("interrupted") or counts.get("pending"):
            self.say("re-run the same command to resume the interrupted and pending trials.")
        if counts.get("submitted"):
            self.say(f"re-run the same command, or `python -m research.sweep status {self.root}`, "
                     "to pick up the SLURM jobs' results.")
        if self.stop_signal is not None:
            return 128 + self.stop_signal
        unfinished = sum(counts.get(s, 0) for s in ("failed", "interrupted", "pending"))
        return 1 if unfinished else 0
