"""Writes metrics to DIR/metrics.jsonl (one JSON object per logged step) and TensorBoard."""

from __future__ import annotations

import json
import os
from typing import Mapping

import jax


class MetricsWriter:
    """Only process 0 writes. On resume, lines after the restored step are dropped first so the
    file reads as if the run had never stopped."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        if os.path.exists(self.path):
            kept = []
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= resume_step:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except (ValueError, KeyError):
                        continue  # a line cut short by a crash
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        import tensorflow as tf  # local: only the writer needs it
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        import tensorflow as tf
        with self._tb.as_default(step=int(step)):
            for name, value in metrics.items():
                tf.summary.scalar(name, float(value))
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
