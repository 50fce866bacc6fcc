"""Writes metrics to DIR/metrics.jsonl (one JSON object per logged step, through
research/workdir.py) and to TensorBoard (DIR/tensorboard/)."""

from __future__ import annotations

import os
from typing import Mapping

import jax

from research import workdir as workdir_lib


class MetricsWriter:
    """Only process 0 writes. On resume, records after the restored step are dropped first so
    the file reads as if the run had never stopped."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.workdir = workdir
        self._tb = None
        if not self.enabled:
            return
        workdir_lib.truncate_metrics(workdir, resume_step)
        # Imported here: TensorFlow is heavy and only this writer (process 0) needs it.
        import tensorflow as tf
        self._tf = tf
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        workdir_lib.append_metrics(self.workdir,
                                   {"step": int(step), **{k: float(v) for k, v in metrics.items()}})
        with self._tb.as_default(step=int(step)):
            for name, value in metrics.items():
                self._tf.summary.scalar(name, float(value))
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
