"""How a trial's `research.train` command is run: on this machine (`local`), on every worker of
a Cloud TPU VM slice (`tpu-vm`), or as a SLURM batch job (`slurm`).

`local` and `tpu-vm` are synchronous: `start` returns a running process the runner waits for
(and signals on Ctrl-C). `slurm` is asynchronous: `submit` queues a job that records its exit
code in ROOT/<trial>/returncode, which a later `run` (or `status`) reads.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from typing import IO

from research import storage
from research.sweep.spec import SweepError, Trial
from research.sweep.trial_log import LOG_FILE, TrialLog, staging_dir

TRAIN_MODULE = "research.train"
# What a SLURM job leaves in ROOT/<trial>/ when it ends: its exit code and run time in seconds.
RETURNCODE_FILE = "returncode"
ELAPSED_FILE = "elapsed_s"


class Launcher:
    """Base: builds the research.train command of a trial and describes it for --dry_run."""

    name = ""
    synchronous = True
    devices_per_trial: int | None = None  # GPUs per concurrent slot (local launcher only)

    def __init__(self, args: argparse.Namespace, root: str, cwd: str):
        self.root = storage.resolve(root)
        self.remote = storage.is_remote(self.root)
        self.cwd = cwd
        self.train_module = getattr(args, "train_module", None) or TRAIN_MODULE
        self.python = sys.executable

    def workdir(self, trial: Trial) -> str:
        return storage.join(self.root, trial.name)

    def log_path(self, trial: Trial) -> str:
        """The file the launcher's output goes to: ROOT/<trial>/train.log, or its local staging
        copy when ROOT is on object storage (trial_log.py)."""
        return TrialLog(self.root, trial.name).path

    def log_note(self, trial: Trial) -> str:
        """For --dry_run with ROOT on object storage: where the staged log is copied."""
        return (f"  # copied to {storage.join(self.workdir(trial), LOG_FILE)}" if self.remote
                else "")

    def train_command(self, trial: Trial) -> list[str]:
        """`python -m research.train ... --workdir=ROOT/<trial>` (recorded in trial.json)."""
        return [self.python, "-m", self.train_module, *trial.train_args(self.workdir(trial))]

    def launch_command(self, trial: Trial) -> list[str] | None:
        """What actually runs when it wraps the training command (None: the command itself)."""
        return None

    def devices(self, slot: int | None) -> str | None:
        """CUDA_VISIBLE_DEVICES of a trial on `slot` (None: the launcher does not set it)."""
        return None

    def dry_run(self, trial: Trial, attempt: int, slot: int | None = None) -> str:
        """The exact text of what would run for this trial (no trailing newline)."""
        raise NotImplementedError

    def start(self, trial: Trial, log: IO, slot: int | None) -> subprocess.Popen:
        """Starts the trial (synchronous launchers); output goes to the open log file."""
        raise NotImplementedError

    def stop(self, trial: Trial, proc: subprocess.Popen, again: bool) -> None:
        """Asks a running trial to checkpoint and exit (SIGTERM); `again`: stop at once."""
        _signal(proc, signal.SIGTERM)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


class LocalLauncher(Launcher):
    """Runs `python -m research.train` as a subprocess of the sweep, cwd = the sweep's cwd.

    With --devices_per_trial=K, the i-th concurrent slot gets CUDA_VISIBLE_DEVICES=iK..iK+K-1
    (a trial takes whichever slot is free), so --parallel=N needs N*K GPUs on the host."""

    name = "local"

    def __init__(self, args: argparse.Namespace, root: str, cwd: str):
        super().__init__(args, root, cwd)
        self.devices_per_trial = getattr(args, "devices_per_trial", None)
        if self.devices_per_trial is not None and self.devices_per_trial < 1:
            raise SweepError(f"--devices_per_trial={self.devices_per_trial}: give a positive "
                             "number of GPUs per trial.")

    def devices(self, slot: int | None) -> str | None:
        """CUDA_VISIBLE_DEVICES for a slot, or None when --devices_per_trial is not given."""
        if self.devices_per_trial is None or slot is None:
            return None
        k = self.devices_per_trial
        return ",".join(str(slot * k + i) for i in range(k))

    def dry_run(self, trial: Trial, attempt: int, slot: int | None = None) -> str:
        env = self.devices(slot)
        prefix = f"CUDA_VISIBLE_DEVICES={env} " if env is not None else ""
        log = shlex.quote(self.log_path(trial))
        return (f"cd {shlex.quote(self.cwd)} && {prefix}{shlex.join(self.train_command(trial))} "
                f">> {log} 2>&1{self.log_note(trial)}")

    def start(self, trial: Trial, log: IO, slot: int | None) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        devices = self.devices(slot)
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices
        # Own session: a terminal Ctrl-C reaches only the sweep, which forwards one SIGTERM
        # (a second signal would make research.train stop without its checkpoint).
        return subprocess.Popen(self.train_command(trial), cwd=self.cwd, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)


class TpuVmLauncher(Launcher):
    """Runs the trial on every worker of a Cloud TPU VM slice with
    `gcloud compute tpus tpu-vm ssh NAME --worker=all --command='cd DIR && ... research.train'`.

    research.train detects the multi-host TPU setup itself. ROOT must be a path that every
    worker and this machine see (a shared filesystem, or object storage: --root=gs://...):
    workers write the run there and the sweep reads final.json from it. Each worker records its
    pid in ROOT/<trial>/.pid.<host> (with ROOT on object storage, which a shell cannot write, in
    its own /tmp/research-sweep-<key>/<trial>.pid), so Ctrl-C on the sweep sends SIGTERM to the
    trainers on all workers (they checkpoint and exit). The workers' output comes back through
    gcloud into train.log. A slice runs one trial at a time: keep --parallel=1 per slice."""

    name = "tpu-vm"

    def __init__(self, args: argparse.Namespace, root: str, cwd: str):
        super().__init__(args, root, cwd)
        if not getattr(args, "tpu_name", None) or not getattr(args, "zone", None):
            raise SweepError("--launcher=tpu-vm needs --tpu_name=NAME and --zone=ZONE "
                             "(and --project=P unless gcloud's default project is right).")
        self.tpu_name = args.tpu_name
        self.zone = args.zone
        self.project = getattr(args, "project", None)
        self.remote_dir = getattr(args, "remote_dir", None) or cwd
        self.python = getattr(args, "remote_python", None) or "python3"

    def gcloud(self, remote_command: str) -> list[str]:
        """`gcloud compute tpus tpu-vm ssh` running a shell command on all workers."""
        cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.tpu_name, f"--zone={self.zone}"]
        if self.project:
            cmd.append(f"--project={self.project}")
        return [*cmd, "--worker=all", f"--command={remote_command}"]

    def pid_dir(self) -> str:
        """Where a worker keeps its trainer's pid when ROOT is on object storage."""
        return "/tmp/research-sweep-" + os.path.basename(staging_dir(self.root))

    def pid_file(self, trial: Trial) -> str:
        if self.remote:
            return shlex.quote(f"{self.pid_dir()}/{trial.name}.pid")
        return shlex.quote(self.workdir(trial)) + "/.pid.$(hostname)"

    def remote_command(self, trial: Trial) -> str:
        mkdir = f"mkdir -p {shlex.quote(self.pid_dir())} && " if self.remote else ""
        return (f"cd {shlex.quote(self.remote_dir)} && {mkdir}echo $$ > {self.pid_file(trial)} && "
                f"exec {shlex.join(self.train_command(trial))}")

    def launch_command(self, trial: Trial) -> list[str]:
        return self.gcloud(self.remote_command(trial))

    def dry_run(self, trial: Trial, attempt: int, slot: int | None = None) -> str:
        return (f"{shlex.join(self.launch_command(trial))} >> {shlex.quote(self.log_path(trial))} "
                f"2>&1{self.log_note(trial)}")

    def start(self, trial: Trial, log: IO, slot: int | None) -> subprocess.Popen:
        return subprocess.Popen(self.launch_command(trial), cwd=self.cwd, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(os.environ), start_new_session=True)

    def stop(self, trial: Trial, proc: subprocess.Popen, again: bool) -> None:
        """SIGTERM to the trainer on every worker (gcloud then returns when they have saved);
        the second time also ends the local gcloud."""
        kill = f"kill -TERM $(cat {self.pid_file(trial)}) 2>/dev/null; true"
        subprocess.Popen(self.gcloud(kill), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL, start_new_session=True)
        if again:
            _signal(proc, signal.SIGTERM)


class SlurmLauncher(Launcher):
    """Submits one `sbatch` job per trial. The job script (ROOT/<trial>/sbatch.sh) runs
    `srun python -m research.train ...` from the sweep's cwd, appends its output to
    ROOT/<trial>/train.log and writes the exit code to ROOT/<trial>/returncode (its run time to
    ROOT/<trial>/elapsed_s). research.train detects SLURM's multi-process setup itself; one
    task per node with all its GPUs (--ntasks_per_node=1 --gpus_per_node=G) is the simple
    layout. A job stopped by its time limit (SIGTERM) checkpoints and is resubmitted by the
    next `run`; add --sbatch_arg=--signal=TERM@120 to get the signal ahead of the kill.

    ROOT on object storage (gs://...), which neither sbatch nor a shell can write: the script
    and the job's output live in the local staging directory (trial_log.staging_dir, under
    ~/.cache, which the compute nodes must share with this machine, as they share the
    checkout), and the job ends with `python -m research.sweep record ROOT/<trial> ...`, which
    copies train.log to ROOT/<trial>/ and writes elapsed_s and returncode there. A job whose
    `cd` into the checkout fails cannot run that; it leaves no returncode, and the next `run`
    finds it gone from the queue and resubmits it."""

    name = "slurm"
    synchronous = False

    def __init__(self, args: argparse.Namespace, root: str, cwd: str):
        super().__init__(args, root, cwd)
        self.python = getattr(args, "remote_python", None) or sys.executable
        self.sweep_name = storage.basename(self.root) or "sweep"
        self.options = [("nodes", getattr(args, "nodes", 1)),
                        ("ntasks-per-node", getattr(args, "ntasks_per_node", 1)),
                        ("gpus-per-node", getattr(args, "gpus_per_node", None)),
                        ("cpus-per-task", getattr(args, "cpus_per_task", None)),
                        ("time", getattr(args, "time", None)),
                        ("partition", getattr(args, "partition", None)),
                        ("account", getattr(args, "account", None))]
        self.extra = list(getattr(args, "sbatch_arg", None) or [])
        if any(ch.isspace() for ch in self.root):
            raise SweepError(f"--root={self.root} has whitespace, which #SBATCH --output cannot "
                             "hold; pick a root without spaces for --launcher=slurm.")

    def job_dir(self, trial: Trial) -> str:
        """The local directory of the job script and output: ROOT/<trial>, or its staging
        directory when ROOT is on object storage."""
        return os.path.dirname(self.log_path(trial))

    def script_path(self, trial: Trial) -> str:
        return os.path.join(self.job_dir(trial), "sbatch.sh")

    def returncode_path(self, trial_dir: str) -> str:
        return storage.join(trial_dir, RETURNCODE_FILE)

    def submit_command(self, trial: Trial) -> list[str]:
        return ["sbatch", "--parsable", self.script_path(trial)]

    def launch_command(self, trial: Trial) -> list[str]:
        return self.submit_command(trial)

    def script(self, trial: Trial, attempt: int) -> str:
        """The sbatch script text for one attempt."""
        workdir = self.workdir(trial)
        log = self.log_path(trial).replace("%", "%%")  # sbatch expands %j etc. in --output
        lines = ["#!/bin/bash", f"#SBATCH --job-name={self.sweep_name}-{trial.name}",
                 f"#SBATCH --output={log}", "#SBATCH --open-mode=append"]
        lines += [f"#SBATCH --{key}={value}" for key, value in self.options if value is not None]
        lines += [f"#SBATCH {arg}" for arg in self.extra]
        rc_file = shlex.quote(self.returncode_path(workdir))
        header = (f"=== research.sweep: trial {trial.name}, attempt {attempt}, slurm job "
                  "${SLURM_JOB_ID} on $(hostname) at $(date -u +%Y-%m-%dT%H:%M:%SZ)")
        if self.remote:
            record = [self.python, "-m", "research.sweep", "record", workdir]
            lines += [
                f"echo \"{header}\"",
                f"cd {shlex.quote(self.cwd)} || exit 1",
                f"srun {shlex.join(self.train_command(trial))}",
                "rc=$?",
                f"{shlex.join(record)} --returncode=\"$rc\" --elapsed_s=\"$SECONDS\" "
                f"--log={shlex.quote(self.log_path(trial))}",
                "exit $rc",
            ]
            return "\n".join(lines) + "\n"
        lines += [
            f"echo \"{header}\"",
            f"cd {shlex.quote(self.cwd)} || {{ echo 1 > {rc_file}; exit 1; }}",
            f"srun {shlex.join(self.train_command(trial))}",
            "rc=$?",
            f"echo \"$SECONDS\" > {shlex.quote(os.path.join(workdir, ELAPSED_FILE))}",
            f"echo \"$rc\" > {rc_file}.tmp && mv {rc_file}.tmp {rc_file}",
            "exit $rc",
        ]
        return "\n".join(lines) + "\n"

    def dry_run(self, trial: Trial, attempt: int, slot: int | None = None) -> str:
        return (f"--- {self.script_path(trial)}\n{self.script(trial, attempt)}"
                f"$ {shlex.join(self.submit_command(trial))}")

    def submit(self, trial: Trial, attempt: int) -> tuple[int, str]:
        """Writes the script, clears the previous attempt's exit code and runs sbatch.
        Returns (sbatch's exit code, job id or sbatch's error output)."""
        workdir = self.workdir(trial)
        for stale in (RETURNCODE_FILE, ELAPSED_FILE):
            storage.remove(storage.join(workdir, stale))
        if self.remote:  # the job appends to a local copy of train.log that `record` uploads
            TrialLog(self.root, trial.name).stage()
        with open(self.script_path(trial), "w", encoding="utf-8") as f:
            f.write(self.script(trial, attempt))
        os.chmod(self.script_path(trial), 0o755)
        try:
            proc = subprocess.run(self.submit_command(trial), cwd=self.cwd, capture_output=True,
                                  text=True, timeout=300)
        except FileNotFoundError:
            return 127, "sbatch not found on PATH; run the sweep on a SLURM login node."
        except subprocess.TimeoutExpired:
            return 124, "sbatch did not answer within 300 s."
        if proc.returncode != 0:
            return proc.returncode, (proc.stderr or proc.stdout).strip()
        job_id = proc.stdout.strip().splitlines()[-1].split(";")[0].strip() if proc.stdout.strip() else ""
        if not job_id:
            return 1, f"sbatch printed no job id (stdout {proc.stdout!r})."
        return 0, job_id


def record_exit(trial_dir: str, returncode: int, elapsed_s: float, log: str | None) -> None:
    """What a SLURM job with ROOT on object storage does when it ends (`python -m research.sweep
    record`): copies its local `log` to TRIAL_DIR/train.log, writes elapsed_s, then returncode
    (last: its presence tells the runner the job ended)."""
    if log is not None and os.path.exists(log):
        storage.upload(log, storage.join(trial_dir, LOG_FILE))
    storage.write_text(storage.join(trial_dir, ELAPSED_FILE), f"{elapsed_s}\n")
    storage.write_text(storage.join(trial_dir, RETURNCODE_FILE), f"{returncode}\n")


def job_in_queue(job_id: str) -> bool | None:
    """Whether SLURM still lists the job (None when squeue is unavailable or unsure)."""
    try:
        proc = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True,
                              text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired, OSError):
        return None
    if proc.returncode == 0:
        return bool(proc.stdout.strip())
    if "invalid job id" in (proc.stderr or "").lower():
        return False
    return None


LAUNCHERS = {"local": LocalLauncher, "tpu-vm": TpuVmLauncher, "slurm": SlurmLauncher}


def make_launcher(name: str, args: argparse.Namespace, root: str, cwd: str) -> Launcher:
    """The launcher called `name` (local, tpu-vm, slurm)."""
    if name not in LAUNCHERS:
        raise SweepError(f"unknown launcher {name!r}; use one of {', '.join(LAUNCHERS)}.")
    return LAUNCHERS[name](args, root, cwd)
