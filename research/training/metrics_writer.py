"""Writes metrics to DIR/metrics.jsonl (one JSON object per logged step, through
research/workdir.py) and to TensorBoard (DIR/tensorboard/).

The TensorBoard event file is written with the `tensorboard` package's record framing and
protos (scalar summaries as `tf.summary.scalar` writes them: a float32 tensor with the
"scalars" plugin's metadata), without TensorFlow, whose import took 6-13 s of every training
run's start on the 2-core CPU. On object storage (a gs:// DIR) the event file is written to a
local temporary directory and copied to DIR/tensorboard/ (one small upload) at most every
`TB_UPLOAD_INTERVAL_S` seconds and on close: an event file is only ever appended to, which
object storage cannot do.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import tempfile
import time
from typing import Mapping

import jax

from research import storage
from research import workdir as workdir_lib

TB_DIR = "tensorboard"
TB_UPLOAD_INTERVAL_S = 30.0
_FILE_COUNTER = itertools.count()  # two writers in one second of one process: two files


class EventFile:
    """One TensorBoard event file in a local directory: TFRecord-framed `Event` protos, the
    first the file version, then one event per `write_scalars` call. The file name follows
    TensorFlow's (`events.out.tfevents.TIME.HOST.PID.N.v2`), so TensorBoard finds it."""

    def __init__(self, directory: str):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.plugins.scalar.summary_v2 import scalar_pb
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event_pb2, self._scalar_pb = event_pb2, scalar_pb
        os.makedirs(directory, exist_ok=True)
        name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
                f"{os.getpid()}.{next(_FILE_COUNTER)}.v2")
        self.path = os.path.join(directory, name)
        self._records = RecordWriter(open(self.path, "wb"))
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event) -> None:
        self._records.write(event.SerializeToString())
        self._records.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """One event at `step` holding a float32 scalar summary per name."""
        event = self._event_pb2.Event(wall_time=time.time(), step=int(step))
        for name, value in scalars.items():
            event.summary.value.extend(self._scalar_pb(name, float(value)).value)
        self._write(event)

    def close(self) -> None:
        self._records.close()


class MetricsWriter:
    """Only process 0 writes. On resume, records after the restored step are dropped first so
    the file reads as if the run had never stopped."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.workdir = workdir
        self._tb: EventFile | None = None
        self._mirror: str | None = None  # the local event-file directory of a gs:// DIR
        self._uploaded = 0.0
        if not self.enabled:
            return
        workdir_lib.truncate_metrics(workdir, resume_step)
        tb_dir = storage.join(workdir, TB_DIR)
        if storage.is_remote(workdir):
            self._mirror = tempfile.mkdtemp(prefix="research-tensorboard-")
            tb_dir = self._mirror
        self._tb = EventFile(tb_dir)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        workdir_lib.append_metrics(self.workdir,
                                   {"step": int(step), **{k: float(v) for k, v in metrics.items()}})
        self._tb.write_scalars(step, metrics)
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
