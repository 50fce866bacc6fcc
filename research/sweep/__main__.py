"""Hyperparameter sweeps over research.train: `python -m research.sweep run|status|collect`.

  run      expand a sweep (gin-syntax sweep file and/or --grid/--zip/--random flags) into
           trials and run each as `python -m research.train ... --workdir=ROOT/<trial>`
           (locally, on a Cloud TPU VM slice, or as SLURM jobs). Re-running the same command
           skips finished trials, resumes interrupted ones and reruns failed ones only with
           --retry_failed.
  status   one line per trial of a sweep root: status, attempts, exit code, a failed trial's
           reason (hang, input error, signal), time, step.
  collect  gather the trials' metrics into tables (python -m research.sweep collect --help).

ROOT may be a local directory or on object storage (--root=gs://bucket/sweeps/lr): the trials
then train with --workdir=gs://bucket/sweeps/lr/<trial>, and status and collect read it there.

Sweep file example (gin syntax; `sweeps/lr.gin`):

  sweep.gin_files = ['configs/models/gpt_tiny.gin', 'configs/runs/pretrain_causal.gin']
  sweep.fixed = {'TRAIN_STEPS': 300, 'EVAL_DATA': 'text:data/austen/persuasion.txt'}
  sweep.grid = {'LEARNING_RATE': [1e-3, 3e-3], 'WARMUP_STEPS': [0, 30]}
  sweep.names = {'LEARNING_RATE': 'lr'}

  python -m research.sweep run sweeps/lr.gin --root=sweeps/lr --parallel=2

Command-line only:

  python -m research.sweep run --gin_file=configs/models/gpt_tiny.gin \\
      --gin_file=configs/runs/pretrain_causal.gin --gin.TRAIN_STEPS=300 \\
      --grid=LEARNING_RATE=1e-3,3e-3 --grid=SEED=0,1,2 --root=sweeps/lr_seeds --dry_run
"""

from __future__ import annotations

import argparse
import os
import sys

from research import cli
from research.config import split_gin_bindings
from research.sweep import collect
from research.sweep.cli_axes import apply_cli
from research.sweep.launchers import make_launcher, record_exit
from research.sweep.runner import Runner
from research.sweep.spec import SweepSpec
from research.sweep.status import print_status
from research.sweep.sweep_file import load_sweep_file

RUN_HELP = """Expands the sweep and runs its trials.

Axes: --grid=NAME=V1,V2 (crossed), --zip=NAME=V1,V2 (all --zip axes zipped together, then
crossed with the grid), --random=NAME=DIST:ARGS drawn --num_samples times from --random_seed
(DIST: log_uniform:LO:HI, uniform:LO:HI, int_uniform:LO:HI, choice:V1,V2); values are gin
literals and bare words are strings (--grid=TransformerConfig.position=learned,rotary); commas
inside quotes or brackets do not split (--grid="MESH_SHAPE={'data': 2},{'fsdp': 2}"). A NAME
with a '.' or in UPPERCASE goes to research.train as --gin.NAME=VALUE; `gin_file` adds
--gin_file=VALUE; other names are labels (they only name trials). --gin.NAME=VALUE and
--gin_file=F apply to every trial. The command line wins over the sweep file: --gin.NAME=V
pins a file axis NAME to V, and --grid/--zip/--random on a name the file fixes sweep it.

Files: ROOT/sweep.json, and per trial ROOT/<trial>/ (research.train's --workdir) with
trial.json, train.log, and final.json once finished. ROOT may be on object storage
(--root=gs://bucket/sweep): trials train into gs://, the sweep's lock is a lease object there
(a second `run` is refused until its heartbeat is a minute old), and train.log is written to a
local copy under ~/.cache/research/sweep that is uploaded every 30 s and when the trial ends;
with --launcher=slurm the job uploads it (and its exit code) when it ends. Exit code 0 when every trial is done (or
in flight on SLURM), 1 when any failed or is unfinished, 128+N when stopped by signal N
(Ctrl-C: running trials save a checkpoint and stop; the same command resumes them)."""


def build_parser() -> argparse.ArgumentParser:
    """The CLI: run, status and collect subcommands."""
    parser = cli.ArgumentParser(prog="python -m research.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{run,status,collect,record}")
    run = sub.add_parser("run", help="run (or resume) a sweep", description=RUN_HELP,
                         allow_abbrev=False,
                         usage="python -m research.sweep run [SWEEP_FILE] --root=DIR "
                               "[--gin_file=F ...] [--gin.NAME=VALUE ...] [--grid=NAME=V1,V2 ...] "
                               "[--zip=NAME=V1,V2 ...] [--random=NAME=DIST:ARGS ...] "
                               "[--num_samples=N] [--random_seed=S] "
                               "[--launcher=local|tpu-vm|slurm] [--parallel=N] [--dry_run] "
                               "[--retry_failed] [launcher flags]",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog="Example: python -m research.sweep run sweeps/lr.gin "
                                "--grid=SEED=0,1,2 --root=sweeps/lr --parallel=2")
    run.add_argument("sweep_file", nargs="?", default=None,
                     help="gin-syntax sweep file binding sweep.* (optional)")
    run.add_argument("--root", required=True, help="sweep directory; one sub-directory per trial")
    run.add_argument("--launcher", default="local", choices=["local", "tpu-vm", "slurm"],
                     help="where trials run (default local)")
    run.add_argument("--gin_file", action="append", default=[],
                     help="gin file for every trial, after sweep.gin_files (repeatable)")
    run.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2",
                     help="grid axis (repeatable)")
    run.add_argument("--zip", action="append", default=[], metavar="NAME=V1,V2",
                     help="zipped axis (repeatable; equal lengths)")
    run.add_argument("--random", action="append", default=[], metavar="NAME=DIST:ARGS",
                     help="random axis, e.g. LEARNING_RATE=log_uniform:1e-4:1e-2 (repeatable)")
    run.add_argument("--num_samples", type=int, default=None, help="random draws")
    run.add_argument("--random_seed", type=int, default=None, help="seed of the random draws")
    run.add_argument("--parallel", type=int, default=1,
                     help="trials at once (local, tpu-vm; slurm submits all)")
    run.add_argument("--dry_run", action="store_true",
                     help="print what would run, trial by trial; touch nothing")
    run.add_argument("--retry_failed", action="store_true", help="run failed trials again")
    local = run.add_argument_group("local launcher")
    local.add_argument("--devices_per_trial", type=int, default=None,
                       help="GPUs per trial: concurrent trials get disjoint CUDA_VISIBLE_DEVICES "
                            "slices (needs parallel x K GPUs)")
    local.add_argument("--train_module", default="research.train", help=argparse.SUPPRESS)
    tpu = run.add_argument_group("tpu-vm launcher (ROOT on a filesystem all workers share, or gs://)")
    tpu.add_argument("--tpu_name", help="Cloud TPU VM name (required)")
    tpu.add_argument("--zone", help="its zone (required)")
    tpu.add_argument("--project", help="its project (default: gcloud's)")
    tpu.add_argument("--remote_dir", default=None,
                     help="repository checkout on the workers (default: the current directory)")
    tpu.add_argument("--remote_python", default=None,
                     help="python on the workers (default python3; slurm: this python)")
    slurm = run.add_argument_group("slurm launcher")
    slurm.add_argument("--nodes", type=int, default=1, help="#SBATCH --nodes (default 1)")
    slurm.add_argument("--ntasks_per_node", type=int, default=1,
                       help="#SBATCH --ntasks-per-node (default 1)")
    slurm.add_argument("--gpus_per_node", default=None, help="#SBATCH --gpus-per-node")
    slurm.add_argument("--cpus_per_task", type=int, default=None, help="#SBATCH --cpus-per-task")
    slurm.add_argument("--time", default=None, help="#SBATCH --time, e.g. 04:00:00")
    slurm.add_argument("--partition", default=None, help="#SBATCH --partition")
    slurm.add_argument("--account", default=None, help="#SBATCH --account")
    slurm.add_argument("--sbatch_arg", action="append", default=[],
                       help="extra #SBATCH line, verbatim (repeatable), e.g. --sbatch_arg=--qos=high")
    status = sub.add_parser("status", help="show each trial's status",
                            description="One line per trial of a sweep root (reads trial.json, "
                                        "final.json, metrics.jsonl; starts nothing).")
    status.add_argument("root", help="the sweep's --root")
    sub.add_parser("collect", help="gather results into tables (see collect --help)",
                   add_help=False)
    record = sub.add_parser("record", help="(run by the SLURM jobs of a gs:// sweep) store a "
                                           "job's exit code, run time and log",
                            description="Run by a SLURM job of a sweep whose ROOT is on object "
                                        "storage: copies the job's log to TRIAL_DIR/train.log and "
                                        "writes elapsed_s and returncode there.")
    record.add_argument("trial_dir", help="ROOT/<trial> (gs://...)")
    record.add_argument("--returncode", type=int, required=True, help="the trainer's exit code")
    record.add_argument("--elapsed_s", type=float, default=0.0, help="the job's run time")
    record.add_argument("--log", default=None, help="the job's local output file")
    return parser


def run_command(argv: list[str]) -> int:
    """`run`: parse flags, build the spec, launcher and runner; run or dry-run."""
    bindings, rest = split_gin_bindings(argv)
    args = build_parser().parse_args(["run", *rest])
    spec = load_sweep_file(args.sweep_file) if args.sweep_file else SweepSpec()
    spec = apply_cli(spec, gin_files=args.gin_file, bindings=bindings, grid=args.grid,
                     zips=args.zip, random=args.random, num_samples=args.num_samples,
                     random_seed=args.random_seed)
    launcher = make_launcher(args.launcher, args, args.root, os.getcwd())
    runner = Runner(spec, launcher, args.root, parallel=args.parallel,
                    retry_failed=args.retry_failed)
    return runner.dry_run() if args.dry_run else runner.run()


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    """Entry point: dispatches to run, status or collect."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "collect":
        return collect.main(argv[1:])
    if argv and argv[0] == "run":
        return run_command(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "status":
        return print_status(args.root)
    if args.command == "record":
        record_exit(args.trial_dir, args.returncode, args.elapsed_s, args.log)
        return 0
    build_parser().print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
