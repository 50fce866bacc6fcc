"""research.sweep with --root on object storage (gs://, a real GCS server on localhost:
tests/gcs_emulator.py): run / status / collect / --retry_failed with a fake trainer that writes
through research.storage, train.log staged locally and copied up (also while a trial runs), the
sweep's lease refusing a second `run`, collect --out=gs://, SLURM jobs reporting through
`research.sweep record`, the tpu-vm command, and one real two-trial sweep through
research.train compared with the same sweep on a local root."""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from research import storage
from research.errors import WorkdirLockedError
from research.sweep import trial_log
from research.sweep.__main__ import main
from research.sweep.collect import collect
from research.sweep.runner import SweepLock
from research.sweep.status import print_status
from research.sweep.trial_state import effective_status, trainer_alive
from research.workdir import WorkdirLock, read_metrics

from .conftest import ROOT, xla_flags

# The fake research.train: MODE=ok finishes, fail exits 3 after some output, sync prints a
# line and finishes only once that line is readable in ROOT/<trial>/train.log on the store
# (i.e. the runner copied the staged log up while the trial was still running).
FAKE_TRAINER = """\
import json, sys, time
from research import storage
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
workdir, mode = args["workdir"], args["gin.MODE"].strip("'")
def metrics(step):
    storage.append_text(storage.join(workdir, "metrics.jsonl"),
                        json.dumps({"step": step, "train/loss": 1.0 / step}) + "\\n")
def final(step):
    metrics(step)
    storage.write_text(storage.join(workdir, "final.json"), json.dumps(
        {"step": step, "num_steps": step, "metrics": {"train/loss": 1.0 / step}}))
print(f"hello from {mode}", flush=True)
if mode == "ok":
    metrics(2)
    final(4)
elif mode == "fail":
    for i in range(30):
        print(f"log line {i}")
    print("ValueError: boom", file=sys.stderr)
    sys.exit(3)
elif mode == "sync":
    log = storage.join(workdir, "train.log")
    deadline = time.time() + 20
    while time.time() < deadline:
        if storage.exists(log) and "hello from sync" in storage.read_text(log):
            final(4)
            sys.exit(0)
        time.sleep(0.1)
    sys.exit(4)
"""


def write(path, text, mode=None):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    if mode is not None:
        os.chmod(path, mode)
    return str(path)


@pytest.fixture
def fake(tmp_path, monkeypatch, gcs_server):
    """A cwd holding fake_train.py; research importable from it; the staging cache in tmp."""
    write(tmp_path / "fake_train.py", FAKE_TRAINER)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(trial_log, "SYNC_S", 0.2)
    return tmp_path


def state_of(root, name):
    return json.loads(storage.read_text(storage.join(root, name, "trial.json")))


def status_rows(root, capsys):
    """`status ROOT`'s lines, durations masked (wall times differ run to run)."""
    capsys.readouterr()
    assert print_status(root) == 0
    return mask_times(capsys.readouterr().out)


def mask_times(table):
    """A status table's rows as lists of cells, every duration ('0.52s', '3m07s') as 'T'."""
    return [re.sub(r"(?<!\S)[\d.]+(e[+-]?\d+)?s(?!\S)|(?<!\S)\d+m\d\ds(?!\S)", "T", line).split()
            for line in table.splitlines()]


ARGS = ["run", "--gin_file=x.gin", "--grid=MODE=ok,fail,sync", "--train_module=fake_train",
        "--parallel=3"]


def test_run_status_collect_retry_on_gcs_match_a_local_root(fake, gcs, capsys):
    root = f"{gcs}/sw"
    assert main([*ARGS, f"--root={root}"]) == 1
    out = capsys.readouterr().out
    assert f"-> {root}/MODE=ok/train.log" in out
    assert f"FAILED MODE=fail: returncode 3, log {root}/MODE=fail/train.log" in out
    assert "    | ValueError: boom" in out  # the tail, read back from the store
    info = json.loads(storage.read_text(f"{root}/sweep.json"))
    assert info["root"] == root and [t["name"] for t in info["trials"]] == [
        "MODE=ok", "MODE=fail", "MODE=sync"]
    ok, failed, synced = (state_of(root, f"MODE={m}") for m in ("ok", "fail", "sync"))
    assert ok["status"] == "done" and ok["returncode"] == 0
    assert failed["status"] == "failed" and failed["returncode"] == 3
    assert synced["status"] == "done"  # its output reached the store while it ran
    log = storage.read_text(f"{root}/MODE=fail/train.log")
    assert log.startswith("=== research.sweep: trial MODE=fail, attempt 1, launcher local")
    assert "log line 29" in log and "ValueError: boom" in log
    assert not storage.exists(f"{root}/.sweep.lock")  # the lease is released
    staged = fake / "cache" / "research" / "sweep"
    assert not [p for p in staged.rglob("*") if p.is_file()]  # staging copies cleaned up

    # --retry_failed reruns the failed trial; its log keeps the first attempt's text
    assert main([*ARGS, f"--root={root}", "--retry_failed"]) == 1
    out = capsys.readouterr().out
    assert "skip MODE=ok (done)" in out and "skip MODE=sync (done)" in out
    assert state_of(root, "MODE=fail")["attempts"] == 2
    log = storage.read_text(f"{root}/MODE=fail/train.log")
    assert log.count("=== research.sweep: trial MODE=fail") == 2 and "attempt 2" in log
    assert log.count("ValueError: boom") == 2

    # the same sweep on a local root: the same status table and collected results
    local = str(fake / "local_sw")
    assert main([*ARGS, f"--root={local}"]) == 1
    assert main([*ARGS, f"--root={local}", "--retry_failed"]) == 1
    assert status_rows(root, capsys) == status_rows(local, capsys)
    assert main(["collect", root, f"--out={gcs}/collected"]) == 0
    assert main(["collect", local]) == 0
    capsys.readouterr()
    for name in ("results.csv", "results_summary.csv"):
        remote_text = storage.read_text(f"{gcs}/collected/{name}")
        local_text = (pathlib.Path(local) / name).read_text()
        assert drop_columns(remote_text) == drop_columns(local_text), name
    assert storage.read_bytes(f"{gcs}/collected/loss_curves.png")[:4] == b"\x89PNG"
    assert main(["collect", root]) == 0  # --out defaults to ROOT, on the store
    assert storage.read_text(f"{root}/results.md").startswith(f"# Sweep results: {root}\n")
    storage.remove(f"{root}/sweep.json")  # without it, the trial directories are found by listing
    markdown = collect(root, out=str(fake / "listed"))
    assert all(f"| MODE={m} " in markdown for m in ("ok", "fail", "sync")), markdown


def drop_columns(csv_text, names=("wall_time_s", "tokens_per_sec")):
    """CSV text without the columns that differ between two runs of one sweep (timings)."""
    import csv
    import io
    rows = list(csv.reader(io.StringIO(csv_text)))
    keep = [i for i, h in enumerate(rows[0]) if not any(n in h for n in names)]
    return [[row[i] for i in keep] for row in rows]


def test_a_second_run_on_the_same_gcs_root_is_refused(fake, gcs, capsys):
    root = f"{gcs}/sw"
    with SweepLock(root):  # another `research.sweep run` holds the root's lease
        assert main([*ARGS, f"--root={root}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "in use by another sweep" in err and f"{root}/.sweep.lock" in err
    assert not storage.exists(f"{root}/MODE=ok/trial.json")  # it touched no trial
    with pytest.raises(WorkdirLockedError):  # and the lease itself refuses a second holder
        with SweepLock(root), SweepLock(root):
            pass
    assert main([*ARGS, "--root=gs://no-such-bucket/sw"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "'no-such-bucket' does not exist" in err


def test_trainer_alive_on_another_host_reads_the_gcs_workdir_lease(gcs):
    """A "running" trial.json from another host counts as alive while research.train's lease
    on the gs:// workdir is fresh, and as interrupted once it is released."""
    tdir = f"{gcs}/sw/MODE=ok"
    state = {"status": "running", "host": "some-other-host", "pid": 1}
    assert not trainer_alive(tdir, state)
    with WorkdirLock(tdir):
        assert trainer_alive(tdir, state) and effective_status(tdir, state)[0] == "running"
    assert effective_status(tdir, state)[0] == "interrupted"


FAKE_SBATCH = """\
#!/bin/bash
# sbatch --parsable SCRIPT: runs the job at once, output appended to its #SBATCH --output
out=$(grep '^#SBATCH --output=' "$2" | cut -d= -f2-)
bash "$2" >> "$out" 2>&1
echo "$$;cluster"
"""


def test_slurm_jobs_on_gcs_report_through_record(fake, gcs, monkeypatch, capsys):
    """With ROOT on gs:// the job script lives in the local staging dir and ends with
    `python -m research.sweep record`, which puts train.log, elapsed_s and returncode on the
    store, where the next `run` reads them."""
    bin_dir = fake / "bin"
    write(bin_dir / "sbatch", FAKE_SBATCH, 0o755)
    write(bin_dir / "srun", '#!/bin/bash\nexec "$@"\n', 0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    root = f"{gcs}/sl"
    args = ["run", "--gin_file=x.gin", "--grid=MODE=ok,fail", f"--root={root}",
            "--launcher=slurm", "--train_module=fake_train"]
    assert main(args) == 0
    assert "2 submitted" in capsys.readouterr().out
    script = pathlib.Path(state_of(root, "MODE=ok")["launch_command"][-1]).read_text()
    assert script.startswith("#!/bin/bash") and str(fake / "cache") in script
    assert f"-m research.sweep record {root}/MODE=ok --returncode=\"$rc\"" in script
    assert storage.read_text(f"{root}/MODE=fail/returncode").strip() == "3"
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "skip MODE=ok (done)" in out and "failed MODE=fail (returncode 3;" in out
    log = storage.read_text(f"{root}/MODE=fail/train.log")
    assert "=== research.sweep: trial MODE=fail, attempt 1, slurm job" in log
    assert "ValueError: boom" in log


def test_tpu_vm_command_with_a_gcs_root(fake, gcs, monkeypatch, capsys):
    """Workers train into gs://; their pid files go to the worker's /tmp (a shell cannot write
    gs://); the gcloud output is staged locally and copied to train.log."""
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3")
    root = f"{gcs}/tpu"
    assert main(["run", "--gin_file=x.gin", "--grid=MODE=ok", f"--root={root}",
                 "--launcher=tpu-vm", "--tpu_name=v4-8", "--zone=z", "--dry_run"]) == 0
    line = capsys.readouterr().out.splitlines()[2]
    pid_dir = "/tmp/research-sweep-" + os.path.basename(trial_log.staging_dir(root))
    staged = os.path.join(trial_log.staging_dir(root), "MODE=ok", "train.log")
    command, redirect = line.split(" >> ")
    mode = "--gin.MODE='ok'"
    assert shlex.split(command)[-1] == (
        f"--command=cd {fake} && mkdir -p {pid_dir} && echo $$ > {pid_dir}/MODE=ok.pid && "
        f"exec python3 -m research.train --gin_file=x.gin {shlex.quote(mode)} "
        f"--workdir={root}/MODE=ok")
    assert redirect == f"{staged} 2>&1  # copied to {root}/MODE=ok/train.log"
    assert not storage.exists(f"{root}/sweep.json")  # a dry run writes nothing


TRAIN_ARGS = ["--gin_file=configs/models/gpt_tiny.gin", "--gin_file=configs/runs/pretrain_causal.gin",
              "--gin.TRAIN_STEPS=3", "--gin.BATCH_SIZE=4", "--gin.SEQ_LEN=16", "--gin.EVAL_DATA=None",
              "--gin.TRAIN_DATA='text:data/austen/northangerabbey.txt'", "--gin.MESH_SHAPE={'data': 1}",
              "--gin.train.progress_bar=False", "--gin.train.log_every=1",
              "--grid=LEARNING_RATE=1e-3,3e-3", "--parallel=2"]


def test_two_trial_sweep_through_research_train_on_gcs(gcs, tmp_path, capsys):
    """`python -m research.sweep run --root=gs://...` with the real trainer; a second `run` on
    the root while it runs is refused with one `error:` line; `status` and `collect` of the
    gs:// root print the same tables as of a local copy of it."""
    # The real cache home (a fresh one would make each trainer rebuild matplotlib's font
    # cache); the sweep's staging directory is removed at the end.
    env = dict(os.environ, XLA_FLAGS=xla_flags(1),
               JAX_PLATFORMS="cpu")
    root = f"{gcs}/e2e"
    run = [sys.executable, "-m", "research.sweep", "run", *TRAIN_ARGS, f"--root={root}"]
    first = subprocess.Popen(run, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not storage.exists(f"{root}/.sweep.lock") and first.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        second = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=60)
        out = first.communicate(timeout=180)[0]
    finally:
        first.kill()
        shutil.rmtree(trial_log.staging_dir(root), ignore_errors=True)
    assert first.returncode == 0, out[-4000:]
    assert second.returncode == 2, second.stderr[-4000:]
    err = second.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "in use by another sweep" in err, err
    for name in ("LEARNING_RATE=0.001", "LEARNING_RATE=0.003"):
        assert json.loads(storage.read_text(f"{root}/{name}/final.json"))["step"] == 3
        assert storage.read_text(f"{root}/{name}/train.log").startswith(
            f"=== research.sweep: trial {name}, attempt 1, launcher local")
        assert len(read_metrics(f"{root}/{name}")) == 3

    with storage.local_copy(root) as local:
        capsys.readouterr()
        assert print_status(root) == 0
        remote_table = capsys.readouterr().out
        assert print_status(local) == 0
        assert remote_table == capsys.readouterr().out and "2 trials: 2 done" in remote_table
        remote_md = collect(root, out=str(tmp_path / "from_gcs"))
        local_md = collect(local, out=str(tmp_path / "from_local"))
    assert remote_md.replace(root, "ROOT") == local_md.replace(local, "ROOT")
    for name in ("results.csv", "results_summary.csv"):
        assert (tmp_path / "from_gcs" / name).read_text() == (tmp_path / "from_local" / name).read_text()
