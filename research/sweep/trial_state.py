"""A trial's bookkeeping under ROOT/<trial>/ (besides research.train's run files, read through
`research.workdir`): trial.json (the sweep's record of its attempts), train.log, and for SLURM
jobs `returncode`/`elapsed_s`; and what all of these say about the trial's status now. ROOT may
be local or on object storage (gs://...): every file goes through research/storage.py.

Statuses: pending (never started), running (a trainer runs it), submitted (a SLURM job is
queued or running), done (final.json exists), interrupted (stopped before the end: the next
`run` resumes it), failed (a nonzero exit code). A failed trial's trial.json also records
its `reason` when the exit code tells one (`failure_reason`): `hang` (the training watchdog
stopped a run that hung, research/training/watchdog.py), `input error` (exit 2: the command or
config is wrong, a rerun fails the same way) or `signal NAME` (killed). `--retry_failed`
reruns failed trials whatever the reason; a hung run resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from typing import Any

from research import storage, workdir
from research.errors import HangError, UserError
from research.sweep.gin_values import to_json
from research.sweep.launchers import ELAPSED_FILE, RETURNCODE_FILE, Launcher, job_in_queue
from research.sweep.spec import Trial
from research.sweep.trial_log import LOG_FILE

STATUS_ORDER = ("done", "failed", "interrupted", "running", "submitted", "pending")
TRIAL_FILE = "trial.json"
TAIL_LINES = 20


def failure_reason(returncode: int | None) -> str | None:
    """Why a trial with this nonzero exit code failed: 'hang', 'input error', 'signal NAME'
    (a negative code, or 128+N from a shell), or None when the code does not say."""
    if returncode == HangError.exit_code:
        return "hang"
    if returncode == UserError.exit_code:
        return "input error"
    if returncode is not None and (returncode < 0 or 128 < returncode < 128 + 65):
        number = -returncode if returncode < 0 else returncode - 128
        try:
            return f"signal {signal.Signals(number).name}"
        except ValueError:
            return f"signal {number}"
    return None


def ended(status: str, returncode: int | None) -> dict[str, Any]:
    """trial.json updates for an attempt that ended with `status` and `returncode`, with the
    failure's `reason` (None unless failed with a telling exit code)."""
    reason = failure_reason(returncode) if status == "failed" else None
    return {"status": status, "returncode": returncode, "reason": reason}


def returncode_text(state: dict[str, Any]) -> str:
    """'returncode 75 (hang)' for messages; without the reason when none is known."""
    reason = state.get("reason")
    return f"returncode {state.get('returncode')}" + (f" ({reason})" if reason else "")


def read_object(file: str) -> dict[str, Any] | None:
    """The JSON object in `file`; None when it is missing, unreadable or not an object."""
    data = workdir.read_json(file)
    return data if isinstance(data, dict) else None


def write_json(file: str, data: Any) -> None:
    """Writes JSON atomically (locally a temp file per process and thread, then rename; on
    object storage one whole-object write)."""
    if storage.is_remote(file):
        storage.write_text(file, json.dumps(data, indent=2) + "\n")
        return
    tmp = f"{file}.tmp.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, file)


def read_state(trial_dir: str) -> dict[str, Any] | None:
    """ROOT/<trial>/trial.json, or None before the trial was planned."""
    return read_object(storage.join(trial_dir, TRIAL_FILE))


def write_state(trial_dir: str, state: dict[str, Any]) -> None:
    write_json(storage.join(trial_dir, TRIAL_FILE), state)


def tail(file: str, lines: int = TAIL_LINES, max_bytes: int = 65536) -> list[str]:
    """The last `lines` lines of a (possibly large) text file, local or on object storage; []
    if it does not exist."""
    try:
        with storage.open_file(file, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-lines:]


def new_state(trial: Trial, launcher: Launcher) -> dict[str, Any]:
    """A fresh trial.json."""
    return {"name": trial.name, "params": to_json(trial.params),
            "command": launcher.train_command(trial), "launcher": launcher.name,
            "status": "pending", "attempts": 0, "returncode": None, "wall_time_s": 0.0,
            "git_commit": None, "git_dirty": None, "started_at": None, "finished_at": None,
            "log": LOG_FILE}


def trainer_alive(trial_dir: str, state: dict[str, Any]) -> bool:
    """Whether the process a "running" trial.json records still runs: on this host, its pid
    lives with this trial's workdir on its command line (/proc: this host only); from another
    host, research.train's DIR/.lock is held (probed only then: a probe could race a trainer
    taking the lock; on object storage the lock is a lease, see research/lease.py)."""
    pid = state.get("pid")
    if state.get("host") == socket.gethostname():
        if not pid:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return storage.basename(trial_dir).encode() in f.read()
        except OSError:
            return True
    return workdir.lock_held(trial_dir)


def effective_status(trial_dir: str, state: dict[str, Any] | None,
                     query_slurm: bool = True) -> tuple[str, dict[str, Any], str]:
    """(status, trial.json updates, note) from what is on disk now: final.json, a SLURM
    job's returncode file, whether a "running" trainer is still alive. Reads only."""
    if workdir.is_finished(trial_dir):
        updates: dict[str, Any] = {}
        if state is not None and state.get("status") == "submitted":
            updates = slurm_outcome(trial_dir, state)
        return "done", {**updates, "status": "done"}, "final.json"
    if state is None:
        return "pending", {}, ""
    status = state.get("status", "pending")
    if status == "submitted":
        return _submitted_status(trial_dir, state, query_slurm)
    if status == "running":
        if trainer_alive(trial_dir, state):
            return "running", {}, f"running in another process (pid {state.get('pid')})"
        return "interrupted", {"status": "interrupted"}, "its sweep stopped while it ran"
    if status == "done":  # final.json was removed
        return "interrupted", {"status": "interrupted"}, "final.json is gone"
    return status, {}, ""


def _submitted_status(trial_dir: str, state: dict[str, Any],
                      query_slurm: bool) -> tuple[str, dict[str, Any], str]:
    """effective_status of a SLURM job without final.json: still queued, gone from the queue
    without an exit code (interrupted), or finished with one (failed / interrupted)."""
    rc_path = storage.join(trial_dir, RETURNCODE_FILE)
    job = f"slurm job {state.get('job_id')}"
    if not storage.exists(rc_path) and query_slurm and state.get("job_id"):
        if job_in_queue(state["job_id"]) is False and not storage.exists(rc_path):
            return ("interrupted", {"status": "interrupted", "finished_at": time.time()},
                    f"{job} left the queue without an exit code")
    if not storage.exists(rc_path):
        return "submitted", {}, job
    updates = slurm_outcome(trial_dir, state)
    status = "failed" if updates["returncode"] != 0 else "interrupted"
    return status, {**updates, **ended(status, updates["returncode"])}, job


def slurm_outcome(trial_dir: str, state: dict[str, Any]) -> dict[str, Any]:
    """returncode / wall time / finish time of a finished SLURM job, from its files."""
    rc_path = storage.join(trial_dir, RETURNCODE_FILE)
    try:
        rc = int(storage.read_text(rc_path).strip() or 1)
        finished = storage.getmtime(rc_path)
    except (OSError, ValueError):
        return {}
    try:
        elapsed = float(storage.read_text(storage.join(trial_dir, ELAPSED_FILE)).strip())
    except (OSError, ValueError):
        elapsed = 0.0
    return {"returncode": rc, "finished_at": finished,
            "wall_time_s": float(state.get("wall_time_s") or 0.0) + elapsed}
