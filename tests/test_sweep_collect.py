"""research.sweep.collect on synthetic sweep roots written by hand (no training)."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from research import workdir
from research.errors import ConfigError
from research.sweep import collect as C
from research.sweep import plots, report, results, tables

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG = """from __gin__ import dynamic_registration
# Macros:
# ==============================================================================
LEARNING_RATE = {lr}
TRAIN_STEPS = 100

# Parameters for train:
# ==============================================================================
train.num_steps = %TRAIN_STEPS
"""


def write_trial(root: pathlib.Path, name: str, *, params: dict | None = None,
                rows: list[dict] | None = None, final: dict | None = None,
                info: dict | None = None, config: str | None = None,
                tail: str = "") -> pathlib.Path:
    """Writes one trial directory: trial.json (when params or info), metrics.jsonl (+ `tail`,
    raw text appended), final.json, config.gin."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    if params is not None or info is not None:
        trial = {"name": name, "status": "pending", "attempts": 0, "returncode": None,
                 "wall_time_s": 0.0, "git_commit": None, "git_dirty": None, "log": "train.log",
                 **({"params": params} if params is not None else {}), **(info or {})}
        (d / "trial.json").write_text(json.dumps(trial))
    if rows is not None or tail:
        text = "".join(json.dumps(r) + "\n" for r in rows or [])
        (d / "metrics.jsonl").write_text(text + tail)
    if final is not None:
        (d / "final.json").write_text(json.dumps(final))
    if config is not None:
        (d / "config.gin").write_text(config)
    return d


def synthetic_rows(rng: np.random.Generator, steps: int = 100) -> list[dict]:
    """metrics.jsonl rows every 10 steps (eval every 25 and at the end) with noisy values."""
    rows = []
    for step in range(10, steps + 1, 10):
        row = {"step": step, "train/loss": float(5.0 - step / 40 + rng.normal(0, 0.1)),
               "train/learning_rate": 1e-3,
               "train/tokens_per_sec": 50.0 if step == 10 else float(rng.uniform(900, 1100))}
        rows.append(row)
    for step in (30, 50, 80, 100):  # eval steps, on logged rows
        row = next(r for r in rows if r["step"] == step)
        row["eval/loss"] = float(rng.uniform(3.0, 4.0))
        row["eval/accuracy"] = float(rng.uniform(0.2, 0.5))
    return rows


@pytest.fixture()
def sweep(tmp_path):
    """A done sweep: LEARNING_RATE x pos x SEED(3), written with sweep.json. Returns
    (root, {trial name: facts})."""
    rng = np.random.default_rng(0)
    root = tmp_path / "sweep"
    root.mkdir()
    trials, facts = [], {}
    for lr in (0.003, 0.001):  # written out of order: the aggregate table sorts
        for pos in ("rotary", "learned"):
            for seed in (0, 1, 2):
                name = f"lr={lr},pos={pos},SEED={seed}"
                params = {"LEARNING_RATE": lr, "pos": pos, "SEED": seed}
                rows = synthetic_rows(rng)
                commit = hashlib.sha1(name.encode()).hexdigest()
                info = {"status": "done", "wall_time_s": float(rng.uniform(60, 120)),
                        "git_commit": commit, "git_dirty": seed == 1, "attempts": 1}
                final = {"step": 100, "num_steps": 100, "metrics": rows[-1], "finished_at": 1.0}
                write_trial(root, name, params=params, rows=rows, final=final, info=info,
                            config=CONFIG.format(lr=lr))
                trials.append({"name": name, "params": params})
                facts[name] = {"params": params, "rows": rows, "info": info}
    spec = {"sweep_file": "s.gin", "base_gin_files": [], "fixed": {"TRAIN_STEPS": 100},
            "axes": ["LEARNING_RATE", "pos", "SEED"], "seed_axes": ["SEED"], "trials": trials}
    (root / "sweep.json").write_text(json.dumps(spec))
    return root, facts


def read_csv(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def num(cell: str) -> float | None:
    return None if cell == "" else float(cell)


def expected_hash(text: str) -> str:
    kept = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()[:12]


def test_per_trial_values(sweep):
    root, facts = sweep
    markdown = C.collect(str(root))
    rows = read_csv(root / "results.csv")
    assert [r["trial"] for r in rows] == list(facts)  # sweep.json order
    for r in rows:
        f = facts[r["trial"]]
        log = f["rows"]
        assert r["status"] == "done" and r["step"] == "100" and r["total_steps"] == "100"
        assert num(r["LEARNING_RATE"]) == f["params"]["LEARNING_RATE"]
        assert r["pos"] == f["params"]["pos"] and r["SEED"] == str(f["params"]["SEED"])
        assert num(r["train/loss"]) == log[-1]["train/loss"]
        assert num(r["eval/loss"]) == log[-1]["eval/loss"]
        evals = [x for x in log if "eval/loss" in x]
        lo = min(evals, key=lambda x: x["eval/loss"])
        hi = max(evals, key=lambda x: x["eval/accuracy"])
        assert num(r["best:eval/loss"]) == lo["eval/loss"]
        assert int(r["best_step:eval/loss"]) == lo["step"]
        assert num(r["best:eval/accuracy"]) == hi["eval/accuracy"]
        assert int(r["best_step:eval/accuracy"]) == hi["step"]
        tps = np.mean([x["train/tokens_per_sec"] for x in log[1:]])
        assert num(r["tokens_per_sec"]) == pytest.approx(tps, rel=1e-12)
        assert num(r["tokens_per_sec"]) > 800  # the compile row (50 tok/s) is left out
        assert num(r["wall_time_s"]) == f["info"]["wall_time_s"]
        dirty = "+" if f["info"]["git_dirty"] else ""
        assert r["git_commit"] == f["info"]["git_commit"][:7] + dirty
        text = (root / r["trial"] / "config.gin").read_text()
        assert r["config_hash"] == expected_hash(text)
        assert "best_ckpt_value" not in r  # no trial has final.json "best"
    assert (root / "results.md").read_text() == markdown
    assert markdown.startswith(f"# Sweep results: {root}")
    assert "12 trials: 12 done" in markdown
    assert "best eval/loss @step" in markdown and "tok/s" in markdown


def test_config_hash_ignores_comments(tmp_path):
    a, b = write_trial(tmp_path, "a"), write_trial(tmp_path, "b")
    (a / "config.gin").write_text("# header\nX = 1\n  # indented comment\nY = 'z'\n")
    (b / "config.gin").write_text("X = 1\nY = 'z'\n# trailing comment\n")
    assert results.config_hash(workdir.read_config(str(a))) \
        == results.config_hash(workdir.read_config(str(b))) == expected_hash("X = 1\nY = 'z'")
    assert results.config_hash(workdir.read_config(str(tmp_path / "missing"))) is None


def test_aggregate_mean_std_over_seeds(sweep):
    root, facts = sweep
    markdown = C.collect(str(root))
    trials = {r["trial"]: r for r in read_csv(root / "results.csv")}
    summary = read_csv(root / "results_summary.csv")
    assert "SEED" not in summary[0] and {"LEARNING_RATE", "pos"} <= set(summary[0])
    keys = [(num(s["LEARNING_RATE"]), s["pos"]) for s in summary]
    assert keys == [(0.001, "learned"), (0.001, "rotary"), (0.003, "learned"), (0.003, "rotary")]
    fields = ["train/loss", "eval/loss", "eval/accuracy", "best:eval/loss", "best:eval/accuracy",
              "tokens_per_sec", "wall_time_s"]
    for s in summary:
        members = [t for t in trials.values()
                   if num(t["LEARNING_RATE"]) == num(s["LEARNING_RATE"]) and t["pos"] == s["pos"]]
        assert len(members) == 3 and s["trials"] == "3" and s["done"] == "3"
        for field in fields:
            values = np.array([num(m[field]) for m in members])
            assert num(s[f"{field}_mean"]) == pytest.approx(values.mean(), rel=1e-12)
            assert num(s[f"{field}_std"]) == pytest.approx(values.std(ddof=1), rel=1e-12)
            assert s[f"{field}_n"] == "3"
    first = summary[0]
    cell = report.fmt_mean(num(first["eval/loss_mean"]), num(first["eval/loss_std"]), 3)
    assert cell.endswith("(n=3)") and " ± " in cell and cell in markdown
    assert "Mean ± sample std (ddof=1) over SEED" in markdown


def test_seed_axes_override(sweep):
    root, _ = sweep
    markdown = C.collect(str(root), seed_axes=[])  # every trial its own group
    summary = read_csv(root / "results_summary.csv")
    assert len(summary) == 12 and all(s["eval/loss_n"] == "1" and s["eval/loss_std"] == ""
                                      for s in summary)
    section = markdown.split("## Mean")[1]
    assert "±" not in section.split("\n", 1)[1].split("|", 1)[1]  # values alone, n=1
    C.collect(str(root), seed_axes=["SEED", "pos"])
    summary = read_csv(root / "results_summary.csv")
    assert [s["LEARNING_RATE"] for s in summary] == ["0.001", "0.003"]
    assert "pos" not in summary[0] and all(s["train/loss_n"] == "6" for s in summary)


def test_png_written(sweep, tmp_path):
    import matplotlib.image as mpimg
    root, _ = sweep
    C.collect(str(root))
    image = mpimg.imread(root / "loss_curves.png")
    assert image.shape[0] == 450 and image.shape[1] == 1300  # two panels: train and eval loss
    rgb = image[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.05
    colors = {tuple(c) for c in np.round(rgb[::7], 2) if c.std() > 0.15}  # saturated pixels
    assert len(colors) >= 4  # one color per group at least
    only_train = tmp_path / "train_only"
    write_trial(only_train, "a", rows=[{"step": 1, "train/loss": 3.0},
                                       {"step": 2, "train/loss": 2.0}])
    C.collect(str(only_train), out=str(tmp_path / "out"))
    image = mpimg.imread(tmp_path / "out" / "loss_curves.png")
    assert image.shape[:2] == (450, 650)
    assert not (only_train / "loss_curves.png").exists()  # --out, not ROOT


def test_robust_to_partial_and_missing(tmp_path):
    root = tmp_path / "mixed"
    rows = [{"step": 10, "train/loss": 4.0, "train/tokens_per_sec": 10.0},
            {"step": 20, "train/loss": 3.5, "train/tokens_per_sec": 900.0,
             "eval/loss": 3.9, "eval/error": 0.4}]
    write_trial(root, "running", params={"LEARNING_RATE": 0.01}, rows=rows,
                info={"status": "running", "wall_time_s": 12.5},
                tail='{"step": 30, "train/loss": 3.')  # a line still being written
    write_trial(root, "queued", params={"LEARNING_RATE": 0.02}, info={"status": "pending"})
    write_trial(root, "junk", params={"LEARNING_RATE": 0.03}, info={"status": "failed"},
                rows=[{"step": "x", "train/loss": 1.0},
                      {"step": 5, "train/loss": "abc", "eval/loss": None, "flag": True},
                      {"step": 6, "train/loss": 2.5}], tail="not json\n[1, 2]\n")
    write_trial(root, "plain_workdir", rows=rows,
                final={"step": 20, "num_steps": 20, "metrics": rows[-1],
                       "best": {"step": 20, "metric": "eval/loss", "value": 3.9}})
    (root / "not_a_trial").mkdir()
    C.collect(str(root))
    got = {r["trial"]: r for r in read_csv(root / "results.csv")}
    assert sorted(got) == ["junk", "plain_workdir", "queued", "running"]
    run = got["running"]
    assert run["status"] == "running" and run["step"] == "20" and run["total_steps"] == ""
    assert num(run["train/loss"]) == 3.5 and num(run["tokens_per_sec"]) == 900.0
    assert num(run["best:eval/error"]) == 0.4  # error: lower is better
    assert num(run["wall_time_s"]) == 12.5 and run["git_commit"] == ""
    queued = got["queued"]
    assert queued["status"] == "pending" and queued["step"] == "" and queued["train/loss"] == ""
    assert queued["LEARNING_RATE"] == "0.02" and queued["tokens_per_sec"] == ""
    junk = got["junk"]
    assert junk["status"] == "failed" and junk["step"] == "6" and num(junk["train/loss"]) == 2.5
    assert junk["eval/loss"] == "" and "flag" not in junk
    plain = got["plain_workdir"]
    assert plain["status"] == "done" and plain["LEARNING_RATE"] == ""
    assert plain["step"] == "20" and plain["total_steps"] == "20"
    assert (plain["best_ckpt_metric"], num(plain["best_ckpt_value"]), plain["best_ckpt_step"]) \
        == ("eval/loss", 3.9, "20")
    markdown = (root / "results.md").read_text()
    assert "4 trials: 1 done, 1 failed, 1 pending, 1 running" in markdown
    assert "| 20/? |" in markdown and "eval/loss 3.9 @20" in markdown


def test_pending_trials_from_sweep_json(tmp_path):
    root = tmp_path / "fresh"
    root.mkdir()
    trials = [{"name": f"lr={lr}", "params": {"LEARNING_RATE": lr}} for lr in (0.1, 0.2)]
    (root / "sweep.json").write_text(json.dumps(
        {"axes": ["LEARNING_RATE"], "seed_axes": ["SEED"], "fixed": {"TRAIN_STEPS": 50},
         "trials": trials}))
    write_trial(root, "lr=0.1", rows=[{"step": 10, "train/loss": 2.0}],
                info={"status": "interrupted"})  # trial.json without params: sweep.json's
    markdown = C.collect(str(root))
    got = read_csv(root / "results.csv")
    assert [(r["trial"], r["status"], r["step"], r["total_steps"], r["LEARNING_RATE"])
            for r in got] == [("lr=0.1", "interrupted", "10", "50", "0.1"),
                              ("lr=0.2", "pending", "", "50", "0.2")]
    assert "2 trials: 1 interrupted, 1 pending" in markdown
    assert [s["train/loss_n"] for s in read_csv(root / "results_summary.csv")] == ["1", "0"]
    # No attempt has finished in either (trial.json wall_time_s 0.0, no finished_at): no wall
    # time, and nothing to average (a 0 would drag the seed mean down).
    assert [r["wall_time_s"] for r in got] == ["", ""]
    assert [s["wall_time_s_n"] for s in read_csv(root / "results_summary.csv")] == ["0", "0"]


def test_single_workdir_as_root(tmp_path):
    workdir = write_trial(tmp_path, "gpt_tiny", rows=[{"step": 5, "train/loss": 3.0}],
                          config="# c\nTRAIN_STEPS = 40\n")
    C.collect(str(workdir))
    (row,) = read_csv(workdir / "results.csv")
    assert (row["trial"], row["status"], row["total_steps"]) == ("gpt_tiny", "incomplete", "40")


def test_metrics_and_sort(sweep):
    root, facts = sweep
    C.collect(str(root), metrics=["eval/accuracy"], sort="-eval/accuracy")
    rows = read_csv(root / "results.csv")
    assert "train/loss" not in rows[0] and "eval/loss" not in rows[0]
    values = [num(r["eval/accuracy"]) for r in rows]
    assert values == sorted(values, reverse=True)
    summary = read_csv(root / "results_summary.csv")
    means = [num(s["eval/accuracy_mean"]) for s in summary]
    assert means == sorted(means, reverse=True)
    C.collect(str(root), sort="SEED")
    assert [r["SEED"] for r in read_csv(root / "results.csv")] == ["0"] * 4 + ["1"] * 4 + ["2"] * 4
    with pytest.raises(results.CollectError, match="no such column"):
        C.collect(str(root), sort="nope")


def test_errors_for_missing_or_empty_dir(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert C.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "holds no trials" in err and "--root" in err
    assert C.main([str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is not a directory" in err


def test_cli_subprocess(sweep):
    root, _ = sweep
    out = root / "report"
    proc = subprocess.run([sys.executable, "-m", "research.sweep.collect", str(root),
                           "--metrics=eval/accuracy,eval/loss", "--sort=eval/loss",
                           f"--out={out}"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"# Sweep results: {root}")
    assert proc.stdout == (out / "results.md").read_text()
    assert {p.name for p in out.iterdir()} == {"results.md", "results.csv",
                                               "results_summary.csv", "loss_curves.png",
                                               "grid.png"}  # two non-seed axes
    assert "grid.png" in proc.stderr.splitlines()[-1]
    values = [num(r["eval/loss"]) for r in read_csv(out / "results.csv")]
    assert values == sorted(values)
    proc = subprocess.run([sys.executable, "-m", "research.sweep.collect", str(root / "nope")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_plot_legend_uses_short_axis_names(tmp_path):
    root = tmp_path / "named"
    root.mkdir()
    params = {"TransformerConfig.position": "rotary", "SEED": 0}
    (root / "sweep.json").write_text(json.dumps(
        {"axes": list(params), "seed_axes": ["SEED"], "trials": [{"name": "t", "params": params}],
         "names": {"TransformerConfig.position": "pos", "SEED": "SEED"}}))
    write_trial(root, "t", rows=[{"step": 1, "train/loss": 2.0}], info={"status": "running"})
    sweep = results.load_sweep(str(root))
    assert plots.group_label(params, sweep.group_axes, sweep.names) == "pos=rotary"
    assert plots.group_label(params, sweep.group_axes) == "TransformerConfig.position=rotary"


def grid_sweep(tmp_path) -> tuple[pathlib.Path, dict]:
    """A 2x3 LEARNING_RATE x WARMUP_STEPS grid, 2 seeds, with short names. Cell (1, 2) has no
    trials; in cell (0, 1) seed 1 is pending (n=1). Returns (root, {(row, col): [(loss, acc)]})."""
    root = tmp_path / "grid"
    root.mkdir()
    values = {(0, 0): [(3.0, 0.30), (3.2, 0.34)], (0, 1): [(2.0, 0.20)],
              (0, 2): [(3.5, 0.50), (3.7, 0.52)], (1, 0): [(2.6, 0.40), (2.2, 0.40)],
              (1, 1): [(1.5, 0.10), (3.5, 0.12)]}  # best mean loss: (0, 1); best acc: (0, 2)
    lrs, warmups = (0.001, 0.01), (240, 0, 60)  # listed out of order: rows/cols sort
    trials = []
    for (i, j), pairs in values.items():
        for seed in (0, 1):
            params = {"LEARNING_RATE": lrs[i], "WARMUP_STEPS": warmups[[1, 2, 0][j]],
                      "SEED": seed}
            name = f"lr={params['LEARNING_RATE']},warmup={params['WARMUP_STEPS']},SEED={seed}"
            trials.append({"name": name, "params": params})
            if seed < len(pairs):
                loss, acc = pairs[seed]
                rows = [{"step": 10, "train/loss": loss + 1, "eval/loss": loss,
                         "eval/accuracy": acc}]
                write_trial(root, name, params=params, rows=rows, info={"status": "done"},
                            final={"step": 10, "num_steps": 10, "metrics": rows[-1]})
    (root / "sweep.json").write_text(json.dumps(
        {"axes": ["LEARNING_RATE", "WARMUP_STEPS", "SEED"], "seed_axes": ["SEED"],
         "names": {"LEARNING_RATE": "lr", "WARMUP_STEPS": "warmup"}, "trials": trials}))
    return root, values


def test_grid_matrix(tmp_path):
    root, values = grid_sweep(tmp_path)
    sweep = results.load_sweep(str(root))
    table = tables.build_table(sweep)
    summary = tables.aggregate(sweep, table)
    assert plots.grid_metric(table) == "eval/loss"
    assert plots.grid_metric(tables.build_table(sweep, ["train/loss", "eval/accuracy"])) \
        == "eval/accuracy"
    assert plots.grid_metric(tables.build_table(sweep, ["train/loss"])) == "train/loss"
    assert plots.grid_metric(table, "best:eval/accuracy") == "best:eval/accuracy"
    with pytest.raises(results.CollectError, match="--grid_metric=nope"):
        plots.grid_metric(table, "nope")
    for metric, k, best in (("eval/loss", 0, (0, 1)), ("eval/accuracy", 1, (0, 2))):
        grid = plots.heatmap_grid(sweep, table, summary, metric)
        assert (grid.row_axis, grid.col_axis) == ("LEARNING_RATE", "WARMUP_STEPS")
        assert (grid.row_label, grid.col_label) == ("lr", "warmup")
        assert grid.row_values == [0.001, 0.01] and grid.col_values == [0, 60, 240]
        assert grid.mean.shape == grid.std.shape == grid.n.shape == (2, 3)
        assert np.isnan(grid.mean[1, 2]) and grid.n[1, 2] == 0
        for (i, j), pairs in values.items():
            xs = [p[k] for p in pairs]
            assert grid.mean[i, j] == pytest.approx(np.mean(xs), rel=1e-12)
            assert grid.n[i, j] == len(xs)
            if len(xs) > 1:
                assert grid.std[i, j] == pytest.approx(np.std(xs, ddof=1), rel=1e-12)
            else:
                assert np.isnan(grid.std[i, j])
        assert grid.best == best
    C.collect(str(root), grid_metric_name="eval/accuracy")
    text = (root / "results.md").read_text()
    assert "Heatmap of the eval/accuracy mean over SEED by lr (rows) × warmup (columns)" in text
    assert "[grid.png](grid.png)" in text


def test_grid_png(tmp_path):
    import matplotlib.image as mpimg
    root, _ = grid_sweep(tmp_path)
    markdown = C.collect(str(root), out=str(tmp_path / "out"))
    image = mpimg.imread(tmp_path / "out" / "grid.png")
    assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 400
    rgb = image[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.05
    red = (rgb[:, 0] > 0.9) & (rgb[:, 1] < 0.1) & (rgb[:, 2] < 0.1)
    assert red.sum() > 100  # the best cell's outline
    grey = (np.abs(rgb - 0.816).max(axis=1) < 0.01)  # the missing cell (#d0d0d0)
    assert grey.sum() > 1000
    assert "[grid.png](grid.png)" in markdown and "eval/loss mean over SEED" in markdown
    assert not (root / "grid.png").exists()


def test_no_grid_without_two_axes(tmp_path):
    root = tmp_path / "one_axis"
    root.mkdir()
    trials = []
    for lr in (0.1, 0.2):
        for seed in (0, 1):
            name, params = f"lr={lr},SEED={seed}", {"LEARNING_RATE": lr, "SEED": seed}
            trials.append({"name": name, "params": params})
            write_trial(root, name, params=params, info={"status": "done"},
                        rows=[{"step": 1, "train/loss": 2.0 + lr + seed, "eval/loss": 3.0}])
    (root / "sweep.json").write_text(json.dumps(
        {"axes": ["LEARNING_RATE", "SEED"], "seed_axes": ["SEED"], "trials": trials}))
    markdown = C.collect(str(root))
    assert not (root / "grid.png").exists() and "grid.png" not in markdown
    sweep = results.load_sweep(str(root))
    table = tables.build_table(sweep)
    assert plots.heatmap_grid(sweep, table, tables.aggregate(sweep, table), "eval/loss") is None
    C.collect(str(root), seed_axes=[])  # LEARNING_RATE x SEED: two axes now
    assert (root / "grid.png").exists()


def test_multi_seed_reads_run_files_and_shares_mean_std(tmp_path):
    """tools/multi_seed.py picks each seed's eval metrics at final.json's best step (else the
    last eval) and reports tables.mean_std's mean and sample std."""
    spec = importlib.util.spec_from_file_location("multi_seed", REPO / "tools" / "multi_seed.py")
    multi_seed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(multi_seed)
    evals = {0: [(10, 0.5), (20, 0.7), (30, 0.6)], 1: [(10, 0.4), (20, 0.55), (30, 0.65)]}
    for seed, points in evals.items():
        rows = [{"step": s, "train/loss": 1.0, "eval/accuracy": a} for s, a in points]
        final = {"step": 30, "num_steps": 30, "metrics": rows[-1]}
        if seed == 0:
            final["best"] = {"step": 20, "metric": "eval/accuracy", "value": 0.7}
        write_trial(tmp_path, f"seed_{seed}", rows=rows, final=final, tail='{"step": 31, "ev')
    per_seed = {s: multi_seed.final_eval_metrics(str(tmp_path / f"seed_{s}")) for s in evals}
    assert per_seed == {0: {"eval/accuracy": 0.7, "step": 20}, 1: {"eval/accuracy": 0.65, "step": 30}}
    summary = multi_seed.summarize(per_seed)["eval/accuracy"]
    assert summary["values"] == [0.7, 0.65]
    mean, std, n = tables.mean_std([0.7, 0.65])
    assert (summary["mean"], summary["std"], n) == (mean, std, 2)
    assert std == pytest.approx(np.std([0.7, 0.65], ddof=1), rel=1e-12)
    write_trial(tmp_path, "no_eval", rows=[{"step": 1, "train/loss": 1.0}])
    with pytest.raises(ConfigError, match="no eval metrics; set EVAL_DATA"):
        multi_seed.final_eval_metrics(str(tmp_path / "no_eval"))
