"""Training into gs:// (a real GCS server on localhost, tests/gcs_emulator.py) through the CLI,
with TRAIN_DATA and VOCAB read from the bucket too: SIGTERM and resume give losses bitwise
equal to an uninterrupted local run, a second trainer on the same gs:// workdir is refused,
TensorBoard events and checkpoints land in the bucket, and generation reads the gs:// run."""

import json
import signal
import subprocess
import sys

from research import storage
from research.checkpoints import init_from
from research.checkpoints.manager import param_shapes

from .conftest import ROOT, run_processes
from .test_reliability import BASE_ARGS, FAST, SLOW, _env, wait_for

STEPS = 16
ARGS = [*BASE_ARGS, f"--gin.TRAIN_STEPS={STEPS}", "--gin.train.checkpoint_every=4"]


def _env_cached(cache_dir):
    """The runs of one test share a JAX compilation cache: later runs load the executables the
    first compiled (the same programs, so the same bits) instead of compiling them again."""
    return dict(_env(), JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _metrics(workdir):
    try:
        lines = storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def _run(args, env, check=True):
    proc, = run_processes([[sys.executable, *args]], 300, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_sigterm_and_resume_on_gcs_equal_a_local_run_and_the_lease_refuses_a_second(
        gcs, tmp_path):
    env = _env_cached(tmp_path / "jax_cache")
    local = tmp_path / "local"
    _run([*ARGS, *FAST, f"--workdir={local}"], env)
    straight = [m["train/loss"] for m in _metrics(str(local))]

    storage.upload(str(ROOT / "data" / "austen" / "northangerabbey.txt"),
                   storage.join(gcs, "data", "northangerabbey.txt"))
    storage.upload(str(ROOT / "data" / "tokenizers" / "austen_8k.model"),
                   storage.join(gcs, "tok", "austen_8k.model"))
    workdir = storage.join(gcs, "run")
    args = [*ARGS, *SLOW, f"--workdir={workdir}",
            f"--gin.TRAIN_DATA='text:{gcs}/data/*.txt'", f"--gin.VOCAB='{gcs}/tok/austen_8k.model'"]
    first = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lease = storage.join(workdir, ".lock")
        wait_for(lambda: storage.exists(lease), first, what="the lease", timeout=180)
        second = _run(args, env, check=False)
        assert first.poll() is None, "the first run ended too early for the lock test"
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"{workdir} is in use by another training run (pid={first.pid}" in second.stderr
        wait_for(lambda: len(_metrics(workdir)) >= 3, first, what="training progress", timeout=180)
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-4000:]
    reached = _metrics(workdir)[-1]["step"]
    assert 3 <= reached < STEPS and "Resume by re-running the same command" in out
    assert not storage.exists(lease)  # released on exit
    assert str(reached) in storage.listdir(storage.join(workdir, "checkpoints"))

    # A save cut short on a bucket (kill -9) leaves a step without Orbax's commit marker: the
    # resumed run must skip it and resume from the last complete step before it.
    storage.remove(storage.join(workdir, "checkpoints", str(reached), "commit_success.txt"))
    _run(args, env)  # resumes from the gs:// checkpoint and finishes
    again = _metrics(workdir)
    assert [m["step"] for m in again] == list(range(1, STEPS + 1))
    assert [m["train/loss"] for m in again] == straight  # bitwise
    assert json.loads(storage.read_text(storage.join(workdir, "final.json")))["step"] == STEPS
    run_info = json.loads(storage.read_text(storage.join(workdir, "run.json")))
    assert run_info["vocab"] == f"{gcs}/tok/austen_8k.model"
    events = storage.listdir(storage.join(workdir, "tensorboard"))
    assert len(events) == 2 and all(e.startswith("events.out.tfevents") for e in events)
    assert storage.getsize(storage.join(workdir, "tensorboard", events[0])) > 0

    # INIT_CHECKPOINT may name the gs:// run: its last step and parameter shapes are found.
    directory, step = init_from.resolve(workdir)
    assert (directory, step) == (storage.join(workdir, "checkpoints"), STEPS)
    assert any(path.endswith("mlp/wi/kernel") for path in param_shapes(directory, step))

    gen = _run(["-m", "research.generate", f"--workdir={workdir}", "--prompt=It is",
                "--max_new_tokens=4"], env)
    assert gen.stdout.strip()


def test_missing_bucket_is_one_error_line(gcs_server):
    proc = _run([*ARGS, "--workdir=gs://nobucket/run"], _env(), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --workdir=gs://nobucket/run: bucket 'nobucket' does not exist. Create it "
        "(`gcloud storage buckets create gs://nobucket`) or fix the path.")
    assert "Traceback" not in proc.stderr
