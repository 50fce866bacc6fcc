"""One error path: a user's mistake ends every CLI with exit code 2 and one `error:` line that
names the culprit and the fix, no traceback (research.cli.entry_point).

Each mistake goes through the real command in a subprocess and fails before anything is
compiled; the workdir, the data and the outputs are left as they were. `CLI_MISTAKES` is the
list the issue asked for; the message each gets is asserted by its fragments.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import gin
import pytest

from research import cli, errors
from research.config import parse_gin
from research.data.tokenizer import load_tokenizer
from research.generate import load_for_generation

from .conftest import ROOT, xla_flags

MODEL = "--gin_file=configs/models/gpt_tiny.gin"
RUN = "--gin_file=configs/runs/pretrain_causal.gin"
TINY = [MODEL, RUN, "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=32",
        "--gin.EVAL_DATA=None", "--gin.train.progress_bar=False"]
TRAIN = [sys.executable, "-m", "research.train"]


def run_cli(argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """`argv` from the repository root on 8 simulated CPU devices, without the huge-page
    re-exec (it only slows the start)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", RESEARCH_HUGEPAGES="0",
               XLA_FLAGS=xla_flags(8))
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def train_cli(args: list[str], tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
    """python -m research.train MODEL ARGS --workdir=TMP/run."""
    return run_cli([*TRAIN, MODEL, *args, f"--workdir={tmp_path / 'run'}"], timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """Exactly one stderr line starts with `error: ` and holds every `expected` fragment; no
    traceback anywhere. Returns that line."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def listing(path: pathlib.Path) -> dict[str, int]:
    """{relative path: size} of every file under `path` ({} if it does not exist)."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))}


@dataclass(frozen=True)
class Mistake:
    """One user mistake: `argv(tmp)` makes its files under tmp and returns the command; the
    `error:` line must hold every fragment of `expected` (`{tmp}` is filled in); `watched`
    (relative to tmp) must be unchanged afterwards, with `run/.lock` as the one file a
    refused `research.train` may leave."""

    argv: Callable[[pathlib.Path], list[str]]
    expected: tuple[str, ...]
    watched: tuple[str, ...] = ("run",)


def _file(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _train(*args: str) -> Callable[[pathlib.Path], list[str]]:
    return lambda tmp: [*TRAIN, *TINY, *(a.format(tmp=tmp) for a in args),
                        f"--workdir={tmp / 'run'}"]


def _gin_syntax(tmp):
    bad = _file(tmp / "bad.gin", "TRAIN_STEPS = 2\ntrain.num_steps = = 3\n")
    return [*TRAIN, *TINY, f"--gin_file={bad}", f"--workdir={tmp / 'run'}"]


def _vocab_not_sentencepiece(tmp):
    _file(tmp / "vocab.model", "not a model\n")
    return _train("--gin.VOCAB='{tmp}/vocab.model'")(tmp)


def _workdir_is_a_file(tmp):
    _file(tmp / "run", "my notes\n")
    return [*TRAIN, *TINY, f"--workdir={tmp / 'run'}"]


def _run_dir(tmp, objective: str) -> pathlib.Path:
    _file(tmp / "run" / "run.json", json.dumps({"objective": objective, "model_config": {},
                                                "vocab": "data/tokenizers/austen_8k.model"}))
    return tmp / "run"


def _generate(workdir: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "research.generate", f"--workdir={workdir}", "--prompt=It is"]


def _sweep_file(tmp):
    spec = _file(tmp / "sweep.gin", "sweep.gin_files = ['configs/models/gpt_tiny.gin']\n"
                                    "sweep.gird = {'SEED': [0, 1]}\n")
    return [sys.executable, "-m", "research.sweep", "run", str(spec), f"--root={tmp / 'sw'}",
            "--dry_run"]


CLI_MISTAKES = {
    "gin file with a syntax error": Mistake(
        _gin_syntax, ("gin file {tmp}/bad.gin, line 2: Unable to parse value in "
                      "`train.num_steps = = 3`", "gin syntax is NAME = VALUE")),
    "--gin string without quotes": Mistake(
        _train("--gin.TRAIN_DATA=text:data/austen/*.txt"),
        ("--gin.TRAIN_DATA=text:data/austen/*.txt: 'text' is not a gin value",
         "strings quoted")),
    "--gin.NAME without a value": Mistake(
        lambda tmp: [*TRAIN, *TINY, "--gin.TRAIN_STEPS", f"--workdir={tmp / 'run'}"],
        ("--gin.TRAIN_STEPS has no value; write --gin.NAME=VALUE",)),
    "unknown gin configurable": Mistake(
        _train("--gin.TransformerConfg.d_model=64"),
        ("unknown gin configurable 'TransformerConfg'. Did you mean 'TransformerConfig'",)),
    "misspelled macro": Mistake(
        _train("--gin.TRAIN_STEPZ=3"), ("--gin.TRAIN_STEPZ: no macro 'TRAIN_STEPZ'",
                                        "Did you mean 'TRAIN_STEPS'")),
    "gin file that does not exist": Mistake(
        _train("--gin_file=configs/runs/pretrain_causl.gin"),
        ("gin file 'configs/runs/pretrain_causl.gin' not found", "configs/runs/")),
    "TRAIN_STEPS=-5": Mistake(
        _train("--gin.TRAIN_STEPS=-5"),
        ("TRAIN_STEPS (train.num_steps) = -5 (int) must be a positive int",
         "--gin.TRAIN_STEPS=1000")),
    "VOCAB that does not exist": Mistake(
        _train("--gin.VOCAB='{tmp}/none.model'"),
        ("VOCAB '{tmp}/none.model' does not exist", "tools/train_tokenizer.py")),
    "VOCAB that is not a SentencePiece model": Mistake(
        _vocab_not_sentencepiece,
        ("VOCAB '{tmp}/vocab.model' is not a SentencePiece model", "tools/train_tokenizer.py")),
    "SEQ_LEN above max_len": Mistake(
        _train("--gin.SEQ_LEN=1024"),
        ("SEQ_LEN=1024 exceeds TransformerConfig.max_len=512", "--gin.SEQ_LEN=512")),
    "MESH_SHAPE for another device count": Mistake(
        _train("--gin.MESH_SHAPE={{'data': 3}}"),
        ("MESH_SHAPE={'data': 3} needs 3 devices but 8 are available",
         "--gin.MESH_SHAPE=\"{'data': -1}\"")),
    "BATCH_SIZE the mesh does not divide": Mistake(
        _train("--gin.BATCH_SIZE=6"), ("BATCH_SIZE=6 must be divisible", "multiple of 8")),
    "--workdir that is a file": Mistake(
        _workdir_is_a_file, ("--workdir={tmp}/run is a file, not a directory",
                             "pick a directory")),
    "unknown data spec scheme": Mistake(
        _train("--gin.TRAIN_DATA='txt:data/austen/*.txt'"),
        ("Unknown document spec 'txt:data/austen/*.txt'", "'text:GLOB'")),
    "data glob that matches nothing": Mistake(
        _train("--gin.TRAIN_DATA='text:{tmp}/corpus/*.txt'"),
        ("text:{tmp}/corpus/*.txt matches no file", "Check the path")),
    "INIT_CHECKPOINT that does not exist": Mistake(
        _train("--gin.train.init_checkpoint='{tmp}/pretrained'"),
        ("INIT_CHECKPOINT '{tmp}/pretrained' does not exist", "Pass a training workdir")),
    "unknown flag": Mistake(
        _train("--steps=2"), ("unrecognized arguments: --steps=2",
                              "`python -m research.train --help` lists the flags")),
    "generate on a directory without run.json": Mistake(
        lambda tmp: _generate(_file(tmp / "run" / "notes.txt", "x").parent),
        ("--workdir={tmp}/run has no readable run.json", "python -m research.train")),
    "generate on a run without checkpoints": Mistake(
        lambda tmp: _generate(_run_dir(tmp, "causal_lm")),
        ("--workdir={tmp}/run has no checkpoints/ yet", "train.checkpoint_every")),
    "convert_checkpoint from a directory that is not an HF checkpoint": Mistake(
        lambda tmp: [sys.executable, "tools/convert_checkpoint.py",
                     f"--from_hf={_file(tmp / 'hf' / 'weights.bin', 'x').parent}",
                     f"--to={tmp / 'out'}"],
        ("{tmp}/hf/config.json not found", "config.json"), watched=("hf", "out")),
    "train_tokenizer on an input that matches nothing": Mistake(
        lambda tmp: [sys.executable, "tools/train_tokenizer.py", f"--input=text:{tmp}/c/*.txt",
                     "--vocab_size=500", f"--output={tmp / 'tok' / 'sp'}"],
        ("text:{tmp}/c/*.txt matches no file",), watched=("tok",)),
    "benchmark without a run config": Mistake(
        lambda tmp: [sys.executable, "-m", "research.benchmark", MODEL, "--steps=1"],
        ("the gin files bind no train.", "pass a model config then a run config"),
        watched=()),
    "sweep file with a misspelled parameter": Mistake(
        _sweep_file, ("sweep has no parameter 'gird'", "Did you mean 'grid'"),
        watched=("sw",)),
}


@pytest.mark.parametrize("name", list(CLI_MISTAKES))
def test_a_mistake_ends_the_cli_with_one_error_line(tmp_path, name):
    mistake = CLI_MISTAKES[name]
    argv = mistake.argv(tmp_path)
    before = {w: listing(tmp_path / w) for w in mistake.watched}
    proc = run_cli(argv)
    assert_one_line_error(proc, *(e.replace("{tmp}", str(tmp_path)) for e in mistake.expected))
    assert proc.returncode == 2
    for watched, files in before.items():
        after = listing(tmp_path / watched)
        after.pop(".lock", None)  # research.train locks DIR before checking the run
        assert after == files, f"{watched} changed: {files} -> {after}"


# ------------------------------------------------------------- the wrapper, in-process -----

@pytest.mark.parametrize("error, code", [
    (errors.ConfigError("VOCAB 'x' does not exist. Train one."), 2),
    (errors.WorkdirLockedError("DIR is in use by another training run."), 2),
    (errors.NonFiniteError("loss is NaN at step 7; lower LEARNING_RATE."), 1),
    (errors.CheckpointSaveError("checkpoint save at step 20 failed."), 1),
])
def test_entry_point_turns_expected_errors_into_one_line(capsys, error, code):
    @cli.entry_point
    def main(argv=None):
        print("started")
        raise error

    assert main([]) == code
    out = capsys.readouterr()
    assert out.out == "started\n"
    assert out.err == f"error: {error}\n"


def test_entry_point_drops_gins_call_note_and_keeps_bugs_loud(capsys):
    @gin.configurable("error_path_probe")
    def probe(value=1):
        raise errors.ConfigError(f"VALUE={value} is wrong; pass --gin.VALUE=2.")

    @cli.entry_point
    def main(argv=None):
        probe()

    assert main() == 2
    assert capsys.readouterr().err == "error: VALUE=1 is wrong; pass --gin.VALUE=2.\n"

    @cli.entry_point
    def buggy(argv=None):
        raise KeyError("a framework bug")

    with pytest.raises(KeyError):
        buggy()
    assert cli.entry_point(lambda: None)() == 0


def test_usage_mistakes_print_the_usage_and_one_error_line(capsys):
    parser = cli.ArgumentParser(prog="python -m research.train")
    parser.add_argument("--workdir", required=True)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m research.train")
    assert err.splitlines()[-1] == ("error: the following arguments are required: --workdir "
                                    "(`python -m research.train --help` lists the flags).")


def test_check_output_dir(tmp_path):
    cli.check_output_dir(str(tmp_path), "--workdir")
    cli.check_output_dir(str(tmp_path / "new" / "deeper"), "--workdir")
    (tmp_path / "file").write_text("x")
    with pytest.raises(errors.ConfigError, match="is a file, not a directory"):
        cli.check_output_dir(str(tmp_path / "file"), "--workdir")
    with pytest.raises(errors.ConfigError, match=r"cannot be created: .*/file is a file"):
        cli.check_output_dir(str(tmp_path / "file" / "run"), "--workdir")
    prefix = str(tmp_path / "file" / "sp8k")  # an output prefix whose directory is a file
    with pytest.raises(errors.ConfigError,
                       match=rf"--output={prefix} cannot be created: .*/file is a file"):
        cli.check_output_dir(str(tmp_path / "file"), "--output", prefix)


# ------------------------------------------- gin and tokenizer mistakes, in-process ---------

FILES = ["configs/models/gpt_tiny.gin", "configs/runs/pretrain_causal.gin"]


@pytest.mark.parametrize("text, bindings, expected", [
    ("train.seed = = 1\n", [], "{gin}, line 1: Unable to parse value in `train.seed = = 1`"),
    ("MESH_SHAPE = {'data': -1\n", [], "gin file {gin}: a bracket or quote is opened and never "
                                      "closed"),
    ("include 'configs/runs/nope.gin'\n", [], "{gin}, line 1: include "
                                             "'configs/runs/nope.gin' not found"),
    ("train.seed = @seed_fn()\n", [], "{gin}, line 1: unknown gin configurable 'seed_fn'"),
    ("", ["train.seed = [0"], "--gin.train.seed=[0: a bracket or quote is opened"),
    ("", ["SEED = zero"], "--gin.SEED=zero: 'zero' is not a gin value"),
    ("", ["train.seed = %SEEDS"], "train.seed is required: set SEEDS in the run config"),
])
def test_gin_mistakes_name_the_file_line_or_flag(tmp_path, text, bindings, expected):
    path = tmp_path / "extra.gin"
    path.write_text(text)
    with pytest.raises(errors.ConfigError) as info:
        parse_gin([*FILES, str(path)], bindings)
    message = str(info.value)
    assert expected.format(gin=path) in message
    assert "\n" not in message


def test_tokenizer_mistakes_are_config_errors(tmp_path):
    (tmp_path / "text.model").write_text("not a model")
    (tmp_path / "binary.txt").write_bytes(bytes(range(128, 256)))
    with pytest.raises(errors.ConfigError, match="does not exist") as missing:
        load_tokenizer(str(tmp_path / "none.model"))
    assert isinstance(missing.value, FileNotFoundError)
    with pytest.raises(errors.ConfigError, match="is a directory, not a tokenizer file"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(errors.ConfigError, match="is not a SentencePiece model"):
        load_tokenizer(str(tmp_path / "text.model"))
    with pytest.raises(errors.ConfigError, match="is not a WordPiece vocab.txt"):
        load_tokenizer(str(tmp_path / "binary.txt"))


def test_generate_refuses_a_run_of_another_objective(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"objective": "bert_pretraining"}))
    with pytest.raises(errors.ConfigError, match="holds a 'bert_pretraining' model; generation "
                                                 "needs an autoregressive"):
        load_for_generation(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["run.json"]
