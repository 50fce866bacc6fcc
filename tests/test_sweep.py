"""research.sweep: expansion and naming, CLI axes, dry runs of every launcher, the run
bookkeeping (skip / resume / failure / retry / Ctrl-C) with a fake trainer, SLURM submission
with a fake sbatch, and one small sweep through the real research.train."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from research.errors import ConfigError, HangError
from research.sweep.__main__ import main
from research.sweep.cli_axes import apply_cli
from research.sweep.expansion import expand
from research.sweep.gin_values import GinExpr, gin_literal, parse_gin_value, split_top_level
from research.sweep.spec import SweepError, SweepSpec
from research.sweep.status import print_status
from research.sweep.sweep_file import load_sweep_file
from research.sweep.trial_state import effective_status, failure_reason, trainer_alive
from research.workdir import WorkdirLock

from .conftest import ROOT, xla_flags

SWEEP_FILE = """\
# comment lines and macros work as in any gin file
EVAL = 'text:data/austen/persuasion.txt'
sweep.gin_files = ['configs/models/gpt_tiny.gin', 'configs/runs/pretrain_causal.gin']
sweep.fixed = {'TRAIN_STEPS': 300, 'EVAL_DATA': %EVAL, 'train.objective': @CausalLMObjective()}
sweep.grid = {'LEARNING_RATE': [1e-3, 3e-3], 'pretraining': ['none', 'mlm']}
sweep.zip = {'pos': ['learned', 'rotary'], 'TransformerConfig.position': ['learned', 'rotary']}
sweep.names = {'LEARNING_RATE': 'lr', 'TransformerConfig.position': ''}
"""


def write(path, text):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def spec_of(tmp_path, text, **cli):
    spec = load_sweep_file(write(tmp_path / "s.gin", text))
    return apply_cli(spec, **cli)


# ------------------------------------------------------------------------ expansion ----------

def test_grid_times_zip_names_and_bindings(tmp_path):
    trials = expand(spec_of(tmp_path, SWEEP_FILE), "/sw")
    assert [t.name for t in trials] == [
        "lr=0.001,pretraining=none,pos=learned", "lr=0.001,pretraining=none,pos=rotary",
        "lr=0.001,pretraining=mlm,pos=learned", "lr=0.001,pretraining=mlm,pos=rotary",
        "lr=0.003,pretraining=none,pos=learned", "lr=0.003,pretraining=none,pos=rotary",
        "lr=0.003,pretraining=mlm,pos=learned", "lr=0.003,pretraining=mlm,pos=rotary"]
    t = trials[1]
    assert t.params == {"LEARNING_RATE": 1e-3, "pretraining": "none", "pos": "rotary",
                        "TransformerConfig.position": "rotary"}
    # labels (pretraining, pos) name trials but never reach research.train
    assert t.train_args("/sw/x") == [
        "--gin_file=configs/models/gpt_tiny.gin", "--gin_file=configs/runs/pretrain_causal.gin",
        "--gin.TRAIN_STEPS=300", "--gin.EVAL_DATA='text:data/austen/persuasion.txt'",
        "--gin.train.objective=@CausalLMObjective()", "--gin.LEARNING_RATE=0.001",
        "--gin.TransformerConfig.position='rotary'", "--workdir=/sw/x"]


def test_random_axes_are_reproducible_and_crossed_with_the_grid(tmp_path):
    text = """\
        sweep.gin_files = ['a.gin']
        sweep.grid = {'SEED': [0, 1]}
        sweep.random = {'LEARNING_RATE': ('log_uniform', 1e-4, 1e-2), 'WARMUP_STEPS': ('int_uniform', 0, 100),
                        'X': ('choice', [1, 2]), 'Y': ('uniform', 0.0, 1.0)}
        sweep.num_samples = 3
        sweep.random_seed = 7
        sweep.names = {'LEARNING_RATE': 'lr'}
    """
    trials = expand(spec_of(tmp_path, text), "/sw")
    again = expand(spec_of(tmp_path, text), "/sw")
    other = expand(spec_of(tmp_path, text, random_seed=8), "/sw")
    assert [t.params for t in trials] == [t.params for t in again]
    assert [t.params for t in trials] != [t.params for t in other]
    assert len(trials) == 6
    draws = [{k: v for k, v in t.params.items() if k != "SEED"} for t in trials]
    assert draws[:3] == draws[3:]  # the same samples under every grid point
    for d in draws:
        assert 1e-4 <= d["LEARNING_RATE"] <= 1e-2 and float(f"{d['LEARNING_RATE']:.4g}") == d["LEARNING_RATE"]
        assert isinstance(d["WARMUP_STEPS"], int) and 0 <= d["WARMUP_STEPS"] <= 100
        assert d["X"] in (1, 2) and 0.0 <= d["Y"] <= 1.0
    first = trials[0]
    assert first.name == (f"SEED=0,lr={first.params['LEARNING_RATE']:.4g},WARMUP_STEPS="
                          f"{first.params['WARMUP_STEPS']},X={first.params['X']},Y={first.params['Y']:.4g}")
    assert f"--gin.LEARNING_RATE={first.params['LEARNING_RATE']!r}" in first.train_args("w")


def test_gin_literals_round_trip():
    values = ["text:a/*.txt", "it's", 1e-4, 3.0, 2, True, False, None, [1, "a"], (1,), (1, 2.5),
              {"data": 2, "fsdp": -1}, {"a": [None, {"b": "c"}]}, GinExpr("@Foo()"), GinExpr("%BAR")]
    emitted = [gin_literal(v) for v in values]
    assert emitted[:8] == ["'text:a/*.txt'", '"it\'s"', "0.0001", "3.0", "2", "True", "False", "None"]
    assert emitted[10:13] == ["(1, 2.5)", "{'data': 2, 'fsdp': -1}", "{'a': [None, {'b': 'c'}]}"]
    assert emitted[8:10] == ["[1, 'a']", "(1,)"] and emitted[13:] == ["@Foo()", "%BAR"]
    assert [parse_gin_value(e) for e in emitted] == values
    with pytest.raises(SweepError, match="finite"):
        gin_literal(float("inf"))


def test_templates_fill_axes_and_root(tmp_path):
    text = """\
        sweep.gin_files = ['a.gin']
        sweep.fixed = {'INIT_CHECKPOINT': '{root}/../pretrain/pretraining={pretraining},SEED={SEED}',
                       'NOTE': '{{literal}} {lr}'}
        sweep.grid = {'pretraining': ['mlm'], 'SEED': [0, 1], 'LEARNING_RATE': [1e-3]}
        sweep.names = {'LEARNING_RATE': 'lr'}
    """
    trials = expand(spec_of(tmp_path, text), "/sw/ft")
    assert dict(trials[1].bindings)["INIT_CHECKPOINT"] == "'/sw/ft/../pretrain/pretraining=mlm,SEED=1'"
    assert dict(trials[1].bindings)["NOTE"] == "'{literal} 0.001'"
    bad = text.replace("SEED={SEED}", "SEED={SEDE}")
    with pytest.raises(SweepError, match=r"names \{SEDE\}, which is not an axis.*Did you mean 'SEED'"):
        expand(spec_of(tmp_path, bad), "/sw/ft")


def test_no_axis_gives_one_trial_and_gin_file_axes(tmp_path):
    spec = apply_cli(SweepSpec(), gin_files=["a.gin"], bindings=["TRAIN_STEPS = 5"])
    (trial,) = expand(spec, "/sw")
    assert trial.name == "trial" and trial.train_args("w") == ["--gin_file=a.gin", "--gin.TRAIN_STEPS=5", "--workdir=w"]
    spec = apply_cli(SweepSpec(), gin_files=["configs/runs/pretrain_causal.gin"],
                     grid=["gin_file=configs/models/gpt_tiny.gin,configs/models/gpt_mini.gin"])
    trials = expand(spec, "/sw")
    assert [t.name for t in trials] == ["gin_file=gpt_tiny", "gin_file=gpt_mini"]
    assert trials[1].gin_files == ("configs/runs/pretrain_causal.gin", "configs/models/gpt_mini.gin")


@pytest.mark.parametrize("text, cli, message", [
    ("sweep.zip = {'A': [1, 2], 'B': [1, 2, 3]}", {}, r"zip axes have unequal lengths \(A: 2, B: 3\)"),
    ("sweep.grid = {'A': [1]}\nsweep.zip = {'A': [2]}", {}, r"axis 'A' is given twice"),
    ("sweep.grid = {'A': [1]}", {"zips": ["A=1,2"]}, r"axis 'A' is given twice"),
    ("", {"grid": ["A=1", "A=2"]}, r"axis 'A' is given twice on the command line"),
    ("sweep.random = {'A': ('loguniform', 1, 2)}\nsweep.num_samples = 2", {},
     r"unknown distribution 'loguniform'.*Did you mean 'log_uniform'"),
    ("sweep.grid = {'A': []}", {}, r"empty axis"),
    ("", {"grid": ["A="]}, r"empty axis 'A'"),
    ("sweep.grid = {'A': [1e-3, 1.00001e-3]}", {}, r"two trials get the name 'A=0.001'"),
    ("sweep.zip = {'a': [1, 2], 'B': [3, 4]}\nsweep.names = {'a': '', 'B': ''}", {},
     r"two trials get the name 'trial'"),
    ("sweep.grid = {'A': [1]}\nsweep.fixed = {'A': 2}", {}, r"'A' is both fixed .* and swept"),
    ("", {"grid": ["A=1"], "bindings": ["A = 2"]}, r"'A' is both fixed"),
    ("sweep.fixed = {'learning_rate': 1}", {}, r"neither a gin binding .* nor a macro"),
    ("sweep.gird = {'A': [1]}", {}, r"sweep has no parameter 'gird'.*Did you mean 'grid'"),
    ("sweep.random = {'A': ('uniform', 0, 1)}", {}, r"set sweep.num_samples"),
    ("sweep.names = {'B': 'b'}\nsweep.grid = {'A': [1]}", {}, r"sweep.names has 'B', which is not an axis"),
    ("", {"bindings": ["TRAIN_DATA = text:x"]}, r"is not a gin literal.*strings need quotes"),
    ("sweep.grid = {'A': 1}", {}, r"must be a list of values"),
])
def test_spec_errors_name_the_problem(tmp_path, text, cli, message):
    with pytest.raises(SweepError, match=message):
        spec = spec_of(tmp_path, "sweep.gin_files = ['a.gin']\n" + text, **cli)
        expand(spec, "/sw")


def test_cli_axes_parsing():
    spec = apply_cli(SweepSpec(), gin_files=["a.gin"], grid=[
        "A=1,2", "B='x','y'", "C='a,b',\"c\"", "MESH_SHAPE={'data': 2, 'fsdp': 1},{'data': 1}",
        "pos=learned,rotary", "D=[1, 2],(3,),None,True,-1e-3"],
        random=["LEARNING_RATE=log_uniform:1e-4:1e-2", "K=choice:a,2", "J=int_uniform:0:9"],
        num_samples=1)
    assert spec.grid == {"A": [1, 2], "B": ["x", "y"], "C": ["a,b", "c"],
                         "MESH_SHAPE": [{"data": 2, "fsdp": 1}, {"data": 1}],
                         "pos": ["learned", "rotary"], "D": [[1, 2], (3,), None, True, -1e-3]}
    assert spec.random == {"LEARNING_RATE": ("log_uniform", 1e-4, 1e-2), "K": ("choice", ["a", 2]),
                           "J": ("int_uniform", 0, 9)}
    assert split_top_level("1, [2, 3] ,'4,5'") == ["1", "[2, 3]", "'4,5'"]
    for bad, message in [("1,[2", "unclosed bracket"), ("'a,b", "unclosed quote"), ("1,,2", "empty value"),
                         ("1)", "unbalanced")]:
        with pytest.raises(SweepError, match=message):
            split_top_level(bad)
    with pytest.raises(SweepError, match="write --grid=NAME=V1,V2"):
        apply_cli(SweepSpec(), grid=["LEARNING_RATE"])


def test_command_line_wins_over_the_sweep_file(tmp_path):
    text = """\
        sweep.gin_files = ['a.gin']
        sweep.fixed = {'SEED': 0, 'TRAIN_STEPS': 10}
        sweep.grid = {'LEARNING_RATE': [1e-3, 3e-3], 'WARMUP_STEPS': [0, 30]}
        sweep.names = {'LEARNING_RATE': 'lr', 'BATCH_SIZE': 'bs'}
    """
    spec = spec_of(tmp_path, text, gin_files=["b.gin"], bindings=["LEARNING_RATE = 0.01", "TRAIN_STEPS = 20"],
                   grid=["SEED=0,1", "WARMUP_STEPS=5", "BATCH_SIZE=8"])
    trials = expand(spec, "/sw")
    assert [t.name for t in trials] == ["WARMUP_STEPS=5,SEED=0,bs=8", "WARMUP_STEPS=5,SEED=1,bs=8"]
    assert trials[1].train_args("w") == [
        "--gin_file=a.gin", "--gin_file=b.gin", "--gin.TRAIN_STEPS=20", "--gin.LEARNING_RATE=0.01",
        "--gin.WARMUP_STEPS=5", "--gin.SEED=1", "--gin.BATCH_SIZE=8", "--workdir=w"]


# ------------------------------------------------------------------------ dry runs -----------

DRY_ARGS = ["run", "--gin_file=configs/models/gpt_tiny.gin", "--gin_file=configs/runs/pretrain_causal.gin",
            "--gin.TRAIN_STEPS=30", "--gin.TRAIN_DATA='text:x.txt'", "--grid=LEARNING_RATE=1e-3,3e-3",
            "--grid=pos=learned", "--root=/nonexistent/sweeps/lr", "--dry_run"]
TRAIN = ("-m research.train --gin_file=configs/models/gpt_tiny.gin --gin_file=configs/runs/pretrain_causal.gin "
         "--gin.TRAIN_STEPS=30")


@pytest.fixture
def dry(monkeypatch, capsys):
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3")
    monkeypatch.chdir(ROOT)

    def run(*extra):
        assert main([*DRY_ARGS, *extra]) == 0
        assert not os.path.exists("/nonexistent")
        return capsys.readouterr().out
    return run


def test_dry_run_local(dry):
    assert dry("--parallel=2", "--devices_per_trial=2") == f"""\
# research.sweep run --dry_run: 2 trials in /nonexistent/sweeps/lr, launcher local, 2 to run
# CUDA_VISIBLE_DEVICES: 2 slots of 2 GPUs; a trial takes a free slot (shown as if trials finish in order)
# [1/2] LEARNING_RATE=0.001,pos=learned
cd {ROOT} && CUDA_VISIBLE_DEVICES=0,1 /usr/bin/python3 {TRAIN} '--gin.TRAIN_DATA='"'"'text:x.txt'"'"'' --gin.LEARNING_RATE=0.001 --workdir=/nonexistent/sweeps/lr/LEARNING_RATE=0.001,pos=learned >> /nonexistent/sweeps/lr/LEARNING_RATE=0.001,pos=learned/train.log 2>&1
# [2/2] LEARNING_RATE=0.003,pos=learned
cd {ROOT} && CUDA_VISIBLE_DEVICES=2,3 /usr/bin/python3 {TRAIN} '--gin.TRAIN_DATA='"'"'text:x.txt'"'"'' --gin.LEARNING_RATE=0.003 --workdir=/nonexistent/sweeps/lr/LEARNING_RATE=0.003,pos=learned >> /nonexistent/sweeps/lr/LEARNING_RATE=0.003,pos=learned/train.log 2>&1
"""


def test_dry_run_tpu_vm(dry):
    q = "'\"'\"'"
    out = dry("--launcher=tpu-vm", "--tpu_name=v4-32", "--zone=us-central2-b", "--project=p",
              "--remote_dir=/home/me/research")
    lines = out.splitlines()
    assert lines[0] == "# research.sweep run --dry_run: 2 trials in /nonexistent/sweeps/lr, launcher tpu-vm, 2 to run"
    assert lines[1] == "# [1/2] LEARNING_RATE=0.001,pos=learned"
    work = "/nonexistent/sweeps/lr/LEARNING_RATE=0.001,pos=learned"
    assert lines[2] == (
        "gcloud compute tpus tpu-vm ssh v4-32 --zone=us-central2-b --project=p --worker=all "
        f"'--command=cd /home/me/research && echo $$ > {work}/.pid.$(hostname) && exec python3 "
        f"{TRAIN} {q}--gin.TRAIN_DATA={q}\"{q}\"{q}text:x.txt{q}\"{q}\"{q}{q} --gin.LEARNING_RATE=0.001 "
        f"--workdir={work}' >> {work}/train.log 2>&1")
    assert len(lines) == 5 and lines[3] == "# [2/2] LEARNING_RATE=0.003,pos=learned"


def test_dry_run_slurm(dry):
    out = dry("--launcher=slurm", "--nodes=2", "--gpus_per_node=8", "--cpus_per_task=16",
              "--time=04:00:00", "--partition=gpu", "--account=lab", "--sbatch_arg=--qos=high",
              "--sbatch_arg=--signal=TERM@120")
    work = "/nonexistent/sweeps/lr/LEARNING_RATE=0.001,pos=learned"
    first = out.split("# [2/2]")[0]
    assert first == f"""\
# research.sweep run --dry_run: 2 trials in /nonexistent/sweeps/lr, launcher slurm, 2 to run
# [1/2] LEARNING_RATE=0.001,pos=learned
--- {work}/sbatch.sh
#!/bin/bash
#SBATCH --job-name=lr-LEARNING_RATE=0.001,pos=learned
#SBATCH --output={work}/train.log
#SBATCH --open-mode=append
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --partition=gpu
#SBATCH --account=lab
#SBATCH --qos=high
#SBATCH --signal=TERM@120
echo "=== research.sweep: trial LEARNING_RATE=0.001,pos=learned, attempt 1, slurm job ${{SLURM_JOB_ID}} on $(hostname) at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
cd {ROOT} || {{ echo 1 > {work}/returncode; exit 1; }}
srun /usr/bin/python3 {TRAIN} '--gin.TRAIN_DATA='"'"'text:x.txt'"'"'' --gin.LEARNING_RATE=0.001 --workdir={work}
rc=$?
echo "$SECONDS" > {work}/elapsed_s
echo "$rc" > {work}/returncode.tmp && mv {work}/returncode.tmp {work}/returncode
exit $rc
$ sbatch --parsable {work}/sbatch.sh
"""
    assert out.count("#!/bin/bash") == 2


# ------------------------------------------------------------------------ fake trainer -------

FAKE_TRAINER = """\
import json, os, signal, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
workdir, mode = args["workdir"], args["gin.MODE"].strip("'")
os.makedirs(workdir, exist_ok=True)
calls = os.path.join(workdir, "calls")
n = int(open(calls).read()) + 1 if os.path.exists(calls) else 1
open(calls, "w").write(str(n))
def metrics(step):
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "train/loss": 1.0 / step}) + "\\n")
def final(step):
    metrics(step)
    json.dump({"step": step, "num_steps": step, "metrics": {"train/loss": 1.0 / step}},
              open(os.path.join(workdir, "final.json"), "w"))
time.sleep(0.05)
if mode == "ok" or (mode == "preempt" and n > 1):
    final(4)
elif mode == "preempt":
    metrics(2)  # stopped early (preempted): exits 0 without final.json
elif mode == "fail":
    for i in range(30):
        print(f"log line {i}")
    print("ValueError: boom", file=sys.stderr)
    sys.exit(3)
elif mode == "hang" and n == 1:
    metrics(2)
    print("error: hang: the train step of step 3 ran 9s, past its 8s limit", file=sys.stderr)
    sys.exit(HANG_EXIT_CODE)  # the training watchdog's exit; the rerun resumes and finishes
elif mode == "hang":
    final(4)
elif mode == "slow":
    def on_term(signum, frame):
        open(os.path.join(workdir, "got_sigterm"), "w").write("1")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    open(os.path.join(workdir, "started"), "w").write("1")
    time.sleep(60)
    sys.exit(5)
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A cwd (not a git repository) holding fake_train.py, the module trials run."""
    write(tmp_path / "fake_train.py",
          FAKE_TRAINER.replace("HANG_EXIT_CODE", str(HangError.exit_code)))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def trial_json(root, name):
    return json.loads((root / name / "trial.json").read_text())


def calls(root, name):
    return int((root / name / "calls").read_text())


def test_run_skips_done_resumes_interrupted_reports_failed(fake, capsys):
    root = fake / "sweep"
    args = ["run", "--gin_file=x.gin", "--gin.TRAIN_STEPS=4", "--grid=MODE=ok,preempt,fail",
            f"--root={root}", "--train_module=fake_train", "--parallel=2"]
    assert main(args) == 1
    out = capsys.readouterr().out
    info = json.loads((root / "sweep.json").read_text())
    assert info["axes"] == ["MODE"] and info["fixed"] == {"TRAIN_STEPS": 4}
    assert info["base_gin_files"] == ["x.gin"] and info["seed_axes"] == ["SEED"]
    assert [t["name"] for t in info["trials"]] == ["MODE=ok", "MODE=preempt", "MODE=fail"]
    assert info["trials"][0]["params"] == {"MODE": "ok"}
    ok, pre, fail = (trial_json(root, n) for n in ("MODE=ok", "MODE=preempt", "MODE=fail"))
    assert ok["status"] == "done" and ok["returncode"] == 0 and ok["attempts"] == 1
    assert ok["command"] == [sys.executable, "-m", "fake_train", "--gin_file=x.gin", "--gin.TRAIN_STEPS=4",
                             "--gin.MODE='ok'", f"--workdir={root}/MODE=ok"]
    assert ok["launcher"] == "local" and ok["log"] == "train.log" and ok["params"] == {"MODE": "ok"}
    assert ok["git_commit"] is None and ok["git_dirty"] is None
    assert ok["wall_time_s"] > 0 and ok["finished_at"] >= ok["started_at"]
    assert pre["status"] == "interrupted" and fail["status"] == "failed" and fail["returncode"] == 3
    assert "sweep " + str(root) + ": 3 trials: 1 done, 1 failed, 1 interrupted" in out
    assert f"FAILED MODE=fail: returncode 3, log {root}/MODE=fail/train.log" in out
    assert "    | ValueError: boom" in out and "    | log line 29" in out and "log line 9\n" not in out
    assert "done MODE=ok in " in out and "--retry_failed" in out
    log = (root / "MODE=fail" / "train.log").read_text()
    assert log.startswith("=== research.sweep: trial MODE=fail, attempt 1, launcher local")

    # second run: done skipped, interrupted resumed, failed reported but not rerun
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "skip MODE=ok (done)" in out and "failed MODE=fail (returncode 3; --retry_failed" in out
    assert (calls(root, "MODE=ok"), calls(root, "MODE=preempt"), calls(root, "MODE=fail")) == (1, 2, 1)
    pre2 = trial_json(root, "MODE=preempt")
    assert pre2["status"] == "done" and pre2["attempts"] == 2 and pre2["wall_time_s"] > pre["wall_time_s"]
    assert (root / "MODE=preempt" / "train.log").read_text().count("=== research.sweep:") == 2
    assert "2 done, 1 failed" in out

    # --retry_failed reruns only the failed one
    assert main([*args, "--retry_failed"]) == 1
    assert (calls(root, "MODE=ok"), calls(root, "MODE=preempt"), calls(root, "MODE=fail")) == (1, 2, 2)
    assert trial_json(root, "MODE=fail")["attempts"] == 2
    capsys.readouterr()

    assert print_status(str(root)) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["trial", "status", "attempts", "rc", "reason", "time", "step"]
    assert table[1].split()[:4] == ["MODE=ok", "done", "1", "0"] and table[1].split()[-1] == "4/4"
    assert table[3].split()[:4] == ["MODE=fail", "failed", "2", "3"]
    assert table[-1] == "3 trials: 2 done, 1 failed"


def test_a_hung_trial_fails_with_reason_hang_and_retry_failed_resumes_it(fake, capsys):
    root = fake / "sweep"
    args = ["run", "--gin_file=x.gin", "--grid=MODE=hang", f"--root={root}",
            "--train_module=fake_train"]
    rc_text = f"returncode {HangError.exit_code} (hang)"
    assert main(args) == 1
    out = capsys.readouterr().out
    state = trial_json(root, "MODE=hang")
    assert state["status"] == "failed" and state["reason"] == "hang"
    assert state["returncode"] == HangError.exit_code
    assert "failed MODE=hang in " in out and f", {rc_text}" in out
    assert f"FAILED MODE=hang: {rc_text}, log {root}/MODE=hang/train.log" in out
    assert "    | error: hang: the train step of step 3" in out

    assert print_status(str(root)) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:5] == ["MODE=hang", "failed", "1", str(HangError.exit_code), "hang"]

    assert main(args) == 1  # failed, hang or not, waits for --retry_failed
    assert f"failed MODE=hang ({rc_text}; --retry_failed reruns it)" in capsys.readouterr().out
    assert calls(root, "MODE=hang") == 1
    assert main([*args, "--retry_failed"]) == 0
    state = trial_json(root, "MODE=hang")
    assert state["status"] == "done" and state["attempts"] == 2 and state["reason"] is None
    capsys.readouterr()
    assert print_status(str(root)) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:4] == ["MODE=hang", "done", "2", "0"]


def test_failure_reasons_from_exit_codes(tmp_path):
    assert failure_reason(HangError.exit_code) == "hang"
    assert failure_reason(ConfigError.exit_code) == "input error"
    assert failure_reason(-signal.SIGKILL) == failure_reason(128 + signal.SIGKILL) == "signal SIGKILL"
    assert failure_reason(1) is None and failure_reason(3) is None
    # A SLURM job's returncode file counts the same way.
    (tmp_path / "returncode").write_text(f"{HangError.exit_code}\n")
    status, updates, _ = effective_status(str(tmp_path), {"status": "submitted", "job_id": "7"},
                                          query_slurm=False)
    assert status == "failed" and updates["reason"] == "hang"


def test_running_from_a_dead_sweep_is_rerun_and_done_needs_final_json(fake, capsys):
    root = fake / "sweep"
    args = ["run", "--gin_file=x.gin", "--grid=MODE=ok", f"--root={root}", "--train_module=fake_train"]
    assert main([*args, "--dry_run"]) == 0 and not root.exists()
    assert main(args) == 0
    state = trial_json(root, "MODE=ok")
    (root / "MODE=ok" / "final.json").unlink()
    state.update(status="running", pid=2 ** 22 + 12345)  # its sweep died; no such process
    (root / "MODE=ok" / "trial.json").write_text(json.dumps(state))
    assert main(args) == 0
    assert calls(root, "MODE=ok") == 2 and trial_json(root, "MODE=ok")["attempts"] == 2
    # a trainer that still runs (its sweep died, it did not) is left alone
    (root / "MODE=ok" / "final.json").unlink()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(root / "MODE=ok")])
    try:
        state = trial_json(root, "MODE=ok")
        state.update(status="running", pid=other.pid)
        (root / "MODE=ok" / "trial.json").write_text(json.dumps(state))
        capsys.readouterr()
        assert main(args) == 0
        assert f"running MODE=ok (running in another process (pid {other.pid}))" in capsys.readouterr().out
        assert calls(root, "MODE=ok") == 2
    finally:
        other.kill()
        other.wait()


def test_ctrl_c_forwards_sigterm_and_marks_interrupted(fake):
    root = fake / "sweep"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "research.sweep", "run", "--gin_file=x.gin",
                             "--grid=MODE=slow,ok", f"--root={root}", "--train_module=fake_train"],
                            cwd=fake, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = root / "MODE=slow" / "started"
    deadline = time.time() + 30
    while not started.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert started.exists()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out
    assert (root / "MODE=slow" / "got_sigterm").exists()
    slow, ok = trial_json(root, "MODE=slow"), trial_json(root, "MODE=ok")
    assert slow["status"] == "interrupted" and slow["returncode"] == 0
    assert ok["status"] == "pending" and ok["attempts"] == 0  # never started after the signal
    assert "received SIGINT: asking 1 running trial(s) to save a checkpoint" in out


# ------------------------------------------------------------------------ slurm --------------

FAKE_SBATCH = """\
#!/bin/bash
echo "$@" >> {log}
n=$(wc -l < {log})
echo "$((1000 + n));cluster"
"""
FAKE_SQUEUE = """\
#!/bin/bash
# squeue -h -j ID -o %T: RUNNING for ids listed in the queue file
if grep -qx "$3" {queue}; then echo RUNNING; else echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1; fi
"""


def test_slurm_submits_and_reads_returncode_files(fake, monkeypatch, capsys):
    bin_dir, root = fake / "bin", fake / "sweep"
    sbatch_log, queue = fake / "sbatch_calls", fake / "queue"
    write(bin_dir / "sbatch", FAKE_SBATCH.format(log=sbatch_log))
    write(bin_dir / "squeue", FAKE_SQUEUE.format(queue=queue))
    for tool in ("sbatch", "squeue"):
        os.chmod(bin_dir / tool, 0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    queue.write_text("1001\n1002\n1003\n1004\n")
    args = ["run", "--gin_file=x.gin", "--grid=MODE=a,b,c,d", f"--root={root}", "--launcher=slurm",
            "--partition=gpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[1/4] submitted MODE=a (slurm job 1001)" in out and "4 submitted" in out
    assert sbatch_log.read_text().splitlines() == [f"--parsable {root}/MODE={m}/sbatch.sh" for m in "abcd"]
    state = trial_json(root, "MODE=a")
    assert state["status"] == "submitted" and state["job_id"] == "1001" and state["attempts"] == 1
    assert state["launch_command"] == ["sbatch", "--parsable", f"{root}/MODE=a/sbatch.sh"]
    script = (root / "MODE=a" / "sbatch.sh").read_text()
    assert "#SBATCH --partition=gpu" in script and f"#SBATCH --output={root}/MODE=a/train.log" in script

    # a: finished; b: failed; c: still queued; d: preempted (exit 0, no final.json)
    for mode, rc in (("a", 0), ("b", 1), ("d", 0)):
        (root / f"MODE={mode}" / "returncode").write_text(f"{rc}\n")
        (root / f"MODE={mode}" / "elapsed_s").write_text("12\n")
    (root / "MODE=a" / "final.json").write_text("{}")
    queue.write_text("1003\n")
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "skip MODE=a (done)" in out and "submitted MODE=c (slurm job 1003)" in out
    assert "failed MODE=b (returncode 1;" in out and "submitted MODE=d (slurm job 1005)" in out
    assert len(sbatch_log.read_text().splitlines()) == 5  # only d resubmitted
    a, b, d = (trial_json(root, f"MODE={m}") for m in "abd")
    assert a["status"] == "done" and a["returncode"] == 0 and a["wall_time_s"] == 12.0
    assert b["status"] == "failed" and b["returncode"] == 1
    assert d["status"] == "submitted" and d["attempts"] == 2 and d["wall_time_s"] == 12.0
    assert not (root / "MODE=d" / "returncode").exists()
    assert "attempt 2" in (root / "MODE=d" / "sbatch.sh").read_text()

    # c left the queue without an exit code (cancelled): resubmitted
    queue.write_text("1005\n")
    assert main(args) == 1
    assert trial_json(root, "MODE=c")["job_id"] == "1006"
    capsys.readouterr()


# ------------------------------------------------------------------------ end to end ---------

def test_two_trial_sweep_through_research_train(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("XLA_FLAGS", xla_flags(1))
    root = tmp_path / "sweep"
    args = ["run", "--gin_file=configs/models/gpt_tiny.gin", "--gin_file=configs/runs/pretrain_causal.gin",
            "--gin.TRAIN_STEPS=3", "--gin.BATCH_SIZE=4", "--gin.SEQ_LEN=16", "--gin.EVAL_DATA=None",
            "--gin.TRAIN_DATA='text:data/austen/northangerabbey.txt'", "--gin.MESH_SHAPE={'data': 1}",
            "--gin.train.progress_bar=False", "--gin.train.log_every=1",
            "--grid=LEARNING_RATE=1e-3,3e-3", f"--root={root}", "--parallel=2"]
    assert main(args) == 0, capsys.readouterr().out
    for name in ("LEARNING_RATE=0.001", "LEARNING_RATE=0.003"):
        final = json.loads((root / name / "final.json").read_text())
        assert final["step"] == 3
        state = trial_json(root, name)
        assert state["status"] == "done" and state["attempts"] == 1 and state["returncode"] == 0
        assert len(state["git_commit"]) == 40 and isinstance(state["git_dirty"], bool)
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "skip LEARNING_RATE=0.001 (done)" in out and "skip LEARNING_RATE=0.003 (done)" in out
    assert trial_json(root, "LEARNING_RATE=0.001")["attempts"] == 1


# ------------------------------------------------------------------------ error path ---------

def test_input_mistakes_end_with_one_error_line(tmp_path, capsys):
    """A bad sweep file, an unknown status root and an unusable collect --out are
    ConfigErrors: exit code 2 and one `error:` line naming the culprit, no traceback."""
    assert issubclass(SweepError, ConfigError)
    bad = write(tmp_path / "bad.gin", "sweep.gin_files = ['a.gin']\nsweep.gird = {'A': [1]}\n")
    cases = [(["run", bad, f"--root={tmp_path / 'r'}", "--dry_run"], "sweep has no parameter 'gird'"),
             (["status", str(tmp_path)], "no sweep.json in"),
             (["collect", str(tmp_path / "absent")], "is not a directory"),
             (["collect", str(tmp_path), f"--out={bad}"], "is a file, not a directory")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, (argv, err)


def test_trainer_alive_on_another_host_reads_the_workdir_lock(tmp_path):
    """A "running" trial.json written on another host counts as alive while research.train's
    DIR/.lock is held (workdir.lock_held), and as dead once it is released."""
    state = {"status": "running", "host": "some-other-host", "pid": 1}
    assert not trainer_alive(str(tmp_path), state)  # no lock file at all
    with WorkdirLock(str(tmp_path)):
        assert trainer_alive(str(tmp_path), state)
        assert effective_status(str(tmp_path), state)[0] == "running"
    assert not trainer_alive(str(tmp_path), state)
    assert effective_status(str(tmp_path), state)[0] == "interrupted"
