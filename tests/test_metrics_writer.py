"""research.training.metrics_writer: TensorBoard event files written without TensorFlow read
back through TensorFlow's own record reader (which checks every CRC) and through TensorBoard's
event accumulator (what the TensorBoard UI loads), with the values, steps and metrics.jsonl
lines that were written."""

import json
import os
import subprocess
import sys

import numpy as np

from research.training.metrics_writer import TB_DIR, MetricsWriter

from .conftest import ROOT

METRICS = {1: {"train/loss": 9.25, "train/accuracy": 0.125},
           2: {"train/loss": 8.5, "train/accuracy": 0.25},
           4: {"train/loss": 7.0625, "eval/loss": 7.5}}


def write_run(workdir, metrics=METRICS, resume_step=0):
    writer = MetricsWriter(str(workdir), resume_step=resume_step)
    for step, values in metrics.items():
        writer.write(step, values)
    writer.close()


def read_with_tensorflow(path):
    """{(step, tag): value} through tf.compat.v1.train.summary_iterator (TensorFlow's reader)."""
    import tensorflow as tf
    from tensorboard.util import tensor_util

    out, first = {}, None
    for event in tf.compat.v1.train.summary_iterator(path):
        if first is None:
            first = event
        for value in event.summary.value:
            assert value.metadata.plugin_data.plugin_name == "scalars"
            array = tensor_util.make_ndarray(value.tensor)
            assert array.shape == () and array.dtype == np.float32
            out[(event.step, value.tag)] = float(array)
    assert first.file_version == "brain.Event:2"
    return out


def test_scalars_read_back_through_tensorflow_and_tensorboard(tmp_path):
    write_run(tmp_path)
    files = os.listdir(tmp_path / TB_DIR)
    assert len(files) == 1 and files[0].startswith("events.out.tfevents.")
    path = str(tmp_path / TB_DIR / files[0])
    expected = {(step, tag): value for step, values in METRICS.items()
                for tag, value in values.items()}
    assert read_with_tensorflow(path) == expected  # values exact in float32

    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.util import tensor_util
    acc = pea.EventAccumulator(str(tmp_path / TB_DIR))
    acc.Reload()
    assert sorted(acc.Tags()["tensors"]) == ["eval/loss", "train/accuracy", "train/loss"]
    loss = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
            for e in acc.Tensors("train/loss")]
    assert loss == [(1, 9.25), (2, 8.5), (4, 7.0625)]
    assert acc.SummaryMetadata("train/loss").data_class == 1  # DATA_CLASS_SCALAR

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": s, **v} for s, v in METRICS.items()]


def test_a_resumed_run_writes_a_second_event_file_and_truncates_the_jsonl(tmp_path):
    write_run(tmp_path)
    write_run(tmp_path, {3: {"train/loss": 6.5}}, resume_step=2)  # resumed from step 2
    files = sorted(os.listdir(tmp_path / TB_DIR))
    assert len(files) == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    read = [read_with_tensorflow(str(tmp_path / TB_DIR / f)) for f in files]
    assert {(3, "train/loss"): 6.5} in read


def test_writing_metrics_does_not_import_tensorflow(tmp_path):
    """Importing TensorFlow took 6-13 s of each training run's start; the writer needs none."""
    code = ("import sys; from research.training.metrics_writer import MetricsWriter; "
            f"w = MetricsWriter({str(tmp_path)!r}); w.write(1, {{'train/loss': 1.0}}); w.close(); "
            "print('tensorflow' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"
    assert len(os.listdir(tmp_path / TB_DIR)) == 1
