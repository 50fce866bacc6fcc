"""What the CLIs print and draw: research/logs.py (one quiet console handler) and
research/plots.py (a run's loss curves from its metrics.jsonl into loss.png)."""

import logging
import os
import warnings

import pytest
from PIL import Image

from research import logs, plots, workdir

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_dir(tmp_path):
    """A run folder whose metrics.jsonl logs train/loss every 10 steps and eval/loss every 20,
    with other metrics beside them."""
    for step in range(10, 101, 10):
        record = {"step": step, "train/loss": 9.0 - 0.05 * step, "train/accuracy": 0.001 * step}
        if step % 20 == 0:
            record["eval/loss"] = 8.5 - 0.04 * step
        workdir.append_metrics(str(tmp_path), record)
    return tmp_path


def test_loss_png_draws_the_losses_logged_in_metrics_jsonl(run_dir):
    path, series = plots.write_loss_png(str(run_dir))
    assert path == str(run_dir / "loss.png")
    rows = workdir.read_metrics(str(run_dir))
    assert [(s.metric, s.steps, s.values) for s in series] == [
        ("train/loss", tuple(r["step"] for r in rows), tuple(r["train/loss"] for r in rows)),
        ("eval/loss", (20, 40, 60, 80, 100), tuple(r["eval/loss"] for r in rows if "eval/loss" in r)),
    ]
    data = (run_dir / "loss.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    with Image.open(run_dir / "loss.png") as image:
        image.verify()
        assert image.format == "PNG" and image.size == (650, 450)


def test_the_figure_holds_exactly_the_series(run_dir, tmp_path):
    series = plots.metric_series(workdir.read_metrics(str(run_dir)))
    fig = plots.plot_series(series, str(tmp_path / "curve.png"), title="run")
    (ax,) = fig.axes
    drawn = [(line.get_label(), tuple(line.get_xdata()), tuple(line.get_ydata()))
             for line in ax.lines]
    assert drawn == [(s.metric, s.steps, s.values) for s in series]
    assert ax.get_xlabel() == "step" and ax.get_title() == "run"


def test_plots_cli_writes_the_png_and_says_where(run_dir, tmp_path, capsys):
    assert plots.main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"loss curve: {run_dir / 'loss.png'} (")
    assert "train/loss 8.500 (step 10) -> 4.000 (step 100)" in out
    assert "eval/loss 7.700 (step 20) -> 4.500 (step 100)" in out
    assert plots.main([str(run_dir), f"--out={tmp_path / 'other.png'}"]) == 0
    assert (tmp_path / "other.png").read_bytes().startswith(PNG_SIGNATURE)


def test_plots_cli_names_a_folder_without_metrics(tmp_path, capsys):
    assert plots.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has no metrics.jsonl records" in err
    assert plots.main([str(tmp_path), "--out=/no/such/folder/x.png"]) == 2


@pytest.fixture
def console(monkeypatch):
    """logs.setup() with TF_CPP_MIN_LOG_LEVEL unset; undoes the handler and levels after."""
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    root = logging.getLogger()
    saved = root.level, {n: logging.getLogger(n).level for n in logs.QUIET_LOGGERS}
    yield
    for handler in [h for h in root.handlers if isinstance(h, logs._TqdmHandler)]:
        root.removeHandler(handler)
    logging.captureWarnings(False)
    root.setLevel(saved[0])
    for name, level in saved[1].items():
        logging.getLogger(name).setLevel(level)


def test_setup_installs_one_quiet_console_handler(console, capsys):
    logs.setup()
    logs.setup()  # idempotent: still one handler
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2"
    ours = [h for h in logging.getLogger().handlers if isinstance(h, logs._TqdmHandler)]
    assert len(ours) == 1
    logging.getLogger("research.x").info("wrote %s", "DIR/metrics.jsonl")
    logging.getLogger("research.x").warning("loss is %s", "nan")
    logging.getLogger("orbax.checkpoint").info("checkpoint internals")
    logging.getLogger("absl").info("Using custom data configuration")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a real warning", UserWarning)
    err = capsys.readouterr().err
    assert "checkpoint internals" not in err and "custom data configuration" not in err
    lines = [line for line in err.splitlines() if line[:1].isdigit()]
    assert [line[9:] for line in lines[:2]] == ["wrote DIR/metrics.jsonl", "WARNING: loss is nan"]
    assert lines[2][9:].startswith("WARNING: ") and lines[2].endswith("UserWarning: a real warning")
    assert all(line[2] == line[5] == ":" and line[8] == " " for line in lines)  # HH:MM:SS


def test_setup_replaces_the_basic_config_handler_absl_installs(console, capsys):
    """absl logs through `logging.basicConfig()` when nothing configured logging yet (Orbax
    does at import): after setup() each line prints once, in our format."""
    root = logging.getLogger()
    saved = list(root.handlers)
    for handler in saved:
        root.removeHandler(handler)
    try:
        logging.basicConfig()
        basic = [h for h in root.handlers if h not in saved]
        assert len(basic) == 1
        logs.setup()
        assert basic[0] not in root.handlers
        logging.getLogger("research.x").info("once")
        err = capsys.readouterr().err
        assert "INFO:research.x:once" not in err and err.count("once") == 1
    finally:
        for handler in saved:
            root.addHandler(handler)


def test_setup_keeps_a_log_level_the_user_chose(console, monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    logs.setup()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
