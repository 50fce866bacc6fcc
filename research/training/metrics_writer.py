"""Writes metrics to DIR/metrics.jsonl (one JSON object per logged step, through
research/workdir.py) and to TensorBoard (DIR/tensorboard/).

On object storage (a gs:// DIR) the TensorBoard event file is written to a local temporary
directory and copied to DIR/tensorboard/ (one small upload) at most every
`TB_UPLOAD_INTERVAL_S` seconds and on close: TensorFlow's own GCS client cannot be pointed at
an emulator, and an event file is only ever appended to, which object storage cannot do.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Mapping

import jax

from research import storage
from research import workdir as workdir_lib

TB_DIR = "tensorboard"
TB_UPLOAD_INTERVAL_S = 30.0


class MetricsWriter:
    """Only process 0 writes. On resume, records after the restored step are dropped first so
    the file reads as if the run had never stopped."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.workdir = workdir
        self._tb = None
        self._mirror: str | None = None  # the local event-file directory of a gs:// DIR
        self._uploaded = 0.0
        if not self.enabled:
            return
        workdir_lib.truncate_metrics(workdir, resume_step)
        # Imported here: TensorFlow is heavy and only this writer (process 0) needs it.
        import tensorflow as tf
        self._tf = tf
        tb_dir = storage.join(workdir, TB_DIR)
        if storage.is_remote(workdir):
            self._mirror = tempfile.mkdtemp(prefix="research-tensorboard-")
            tb_dir = self._mirror
        self._tb = tf.summary.create_file_writer(tb_dir)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        workdir_lib.append_metrics(self.workdir,
                                   {"step": int(step), **{k: float(v) for k, v in metrics.items()}})
        with self._tb.as_default(step=int(step)):
            for name, value in metrics.items():
                self._tf.summary.scalar(name, float(value))
        self._tb.flush()
        if self._mirror and time.monotonic() - self._uploaded > TB_UPLOAD_INTERVAL_S:
            self._upload()

    def _upload(self) -> None:
        for name in os.listdir(self._mirror):
            storage.upload(os.path.join(self._mirror, name),
                           storage.join(self.workdir, TB_DIR, name))
        self._uploaded = time.monotonic()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
            if self._mirror:
                self._upload()
                shutil.rmtree(self._mirror, ignore_errors=True)
                self._mirror = None
