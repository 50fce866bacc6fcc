"""Classification checkpoints behind /v1/classify: the model, parameters, tokenizer and label
names of a `classification` workdir, and a batched, jitted forward pass over bucketed shapes.

Where things come from:
  model        run.json's model_config, with the run's head (`ClassificationObjective` as
               bound in DIR/config.gin; a converted HF classifier: run.json's num_labels)
  parameters   DIR/checkpoints (the latest step, or `step`)
  input layout encoder ([CLS] a [SEP] b [SEP]) or decoder ([BOS] a [SEP] b [EOS]), as in
               training (`encode_example`), truncated to run.json's seq_len (or `max_len`)
  label names  run.json's label_names, else ClassificationObjective.label_names of
               config.gin, else the sorted string labels of the run's training data (as
               training found them), else (a converted HF classifier) the id2label of its
               config.json, else the class ids "0", "1", ...

Inputs are padded to a bucket of lengths (powers of two from 16 up to the sequence length)
and of batch sizes (powers of four up to `max_batch`, and `max_batch`), so a request never
compiles: `warmup` compiles every bucket before serving. Concurrent callers share forward
passes: one thread runs them, each over the examples of every request waiting then (up to
`max_batch` rows a pass), so N clients sending one text each cost about N / max_batch passes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
from typing import Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from research import storage
from research import workdir as workdir_lib
from research.data.classification.encoding import encode_example
from research.data.tokenizer import load_tokenizer
from research.decoding.layout import Layout
from research.errors import ConfigError
from research.generate import restore_workdir_params
from research.models.heads import SequenceClassifier
from research.models.transformer import TransformerConfig
from research.training import partitioning

log = logging.getLogger(__name__)

MIN_BUCKET = 16


def length_buckets(seq_len: int) -> list[int]:
    """Powers of two from MIN_BUCKET below seq_len, then seq_len."""
    out, b = [], MIN_BUCKET
    while b < seq_len:
        out.append(b)
        b *= 2
    return out + [seq_len]


def batch_buckets(max_batch: int) -> list[int]:
    """1, 4, 16, ... below max_batch, then max_batch."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 4
    return out + [max_batch]


def _bucket(n: int, buckets: Sequence[int]) -> int:
    return next(b for b in buckets if b >= n)


@dataclasses.dataclass
class RunFacts:
    """What a classification workdir says about its head and inputs."""

    task: str                       # binary, multiclass or regression
    num_labels: int
    label_names: list[str]          # index = class id ([] for regression)
    pair: bool | None               # a sentence-pair task; None = unknown (either accepted)


def _gin_value(name: str):
    """A parameter bound in the parsed config.gin (a macro evaluated), or None."""
    try:
        value = gin.query_parameter(name)
    except ValueError:
        return None
    if isinstance(value, gin.config.ConfigurableReference):
        try:
            value = value.scoped_configurable_fn()
        except Exception:  # noqa: BLE001 - a reference to a configurable, not a macro
            return None
    return value


def read_run_facts(workdir: str, info: dict) -> RunFacts:
    """The run's task, label count, label names and text fields (see the module docstring)."""
    objective, train_data = _bound_objective(workdir)
    if objective is None:  # a converted HF classifier: run.json, and the HF config's names
        num = int(info.get("num_labels") or 2)
        names = info.get("label_names") or _hf_label_names(info, num) or range(num)
        return RunFacts("multiclass" if num > 2 else "binary", num, [str(n) for n in names],
                        None)
    names = info.get("label_names") or objective.label_names
    if objective.regression:
        names = []
    elif names is None and isinstance(train_data, str):
        names = _training_label_names(objective, train_data)
    if names is None:
        names = [str(i) for i in range(objective.num_labels)]
    return RunFacts(objective.task, objective.num_labels, [str(n) for n in names],
                    len(objective.text_fields) > 1)


def _bound_objective(workdir: str):
    """(ClassificationObjective as DIR/config.gin binds it, train.train_data), or (None, None)
    without a readable config.gin. gin's global config is left empty."""
    config = workdir_lib.read_config(workdir)
    if not config:
        return None, None
    import research.configurables  # noqa: F401 - registers what config.gin names
    from research.objectives.classification import ClassificationObjective
    try:
        with gin.unlock_config():
            gin.clear_config()
            gin.parse_config(config, skip_unknown=True)
        return ClassificationObjective(), _gin_value("train.train_data")
    except Exception as err:  # noqa: BLE001 - an unreadable config: fall back to run.json
        log.warning("could not read %s/config.gin (%s); using run.json alone.", workdir, err)
        return None, None
    finally:
        gin.clear_config()


def _hf_label_names(info: dict, num: int) -> list[str] | None:
    """id2label of the Hugging Face config.json a converted run came from, or None."""
    hf_dir = (info.get("source") or {}).get("hf_dir")
    config = workdir_lib.read_json(storage.join(hf_dir, "config.json")) if hf_dir else None
    id2label = (config or {}).get("id2label") or {}
    try:
        names = [id2label[str(i)] for i in range(num)]
    except KeyError:
        return None
    return [str(n) for n in names]


def _training_label_names(objective, spec: str) -> list[str] | None:
    """The label names training found in its data `spec` (train.train_data), or None."""
    try:
        return objective.open_source(spec, role="train").label_names or None
    except Exception as err:  # noqa: BLE001 - the data moved: names are ids then
        log.warning("label names: could not read the training data %r (%s); labels are class "
                    "ids.", spec, err)
        return None


@dataclasses.dataclass
class _Job:
    """One caller's examples, their encodings and the future of their scores."""

    examples: list[tuple[str, ...]]
    encoded: list[tuple[list[int], list[int]]] = dataclasses.field(default_factory=list)
    future: concurrent.futures.Future = dataclasses.field(
        default_factory=concurrent.futures.Future)


class Classifier:
    """A classification checkpoint ready to score texts. Thread-safe: concurrent `scores`
    calls are batched together by one worker thread."""

    def __init__(self, model: SequenceClassifier, params, tokenizer, facts: RunFacts, *,
                 seq_len: int, max_batch: int, layout: Layout | None = None):
        self.model, self.params, self.tokenizer, self.facts = model, params, tokenizer, facts
        self.layout = layout or Layout.single_device()
        self.style = "decoder" if model.cfg.causal else "encoder"
        self.seq_len, self.max_batch = seq_len, max_batch
        self.lengths, self.batches = length_buckets(seq_len), batch_buckets(max_batch)
        self.forward_passes = 0  # forward passes run so far
        self._lock = threading.Lock()  # one forward pass at a time
        self._starting = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._apply = jax.jit(lambda p, ids, mask, types, last: model.apply(
            {"params": p}, ids, mask, types, last, deterministic=True))

    @property
    def regression(self) -> bool:
        return self.facts.task == "regression"

    def encode(self, texts: Sequence[str]) -> list[int]:
        ids, _ = encode_example(tuple(texts), self.tokenizer, self.seq_len, style=self.style)
        return ids

    def scores(self, examples: Sequence[Sequence[str]]) -> np.ndarray:
        """float32 [N, C]: class probabilities (softmax), or [N, 1] regression values, of
        examples of 1 or 2 texts each, scored in forward passes shared with the other
        callers waiting at the time."""
        return self.submit(examples).result()

    def submit(self, examples: Sequence[Sequence[str]]) -> concurrent.futures.Future:
        """`scores(examples)` as a future (await it with asyncio.wrap_future: no thread
        waits per request)."""
        job = _Job([tuple(t) for t in examples])
        if not job.examples:
            job.future.set_result(np.zeros((0, 1 if self.regression else
                                            self.facts.num_labels), np.float32))
            return job.future
        with self._starting:
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="classifier",
                                                daemon=True)
                self._worker.start()
        self._jobs.put(job)
        return job.future

    def _serve(self) -> None:
        """The worker: takes the waiting jobs (up to max_batch examples, at least one job),
        scores them together and wakes their callers; a job that fails to encode fails
        alone."""
        while True:
            jobs = [self._jobs.get()]
            size = len(jobs[0].examples)
            while size < self.max_batch:
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
                size += len(jobs[-1].examples)
            ready = []
            for job in jobs:
                try:
                    job.encoded = [encode_example(t, self.tokenizer, self.seq_len,
                                                  style=self.style) for t in job.examples]
                    ready.append(job)
                except Exception as err:  # noqa: BLE001 - the caller gets it
                    job.future.set_exception(err)
            if ready:
                self._score_jobs(ready)

    def _score_jobs(self, jobs: list[_Job]) -> None:
        """Scores the encoded examples of `jobs` in passes of max_batch; resolves each future
        with its rows (or every one with the error of a failed pass)."""
        try:
            rows = [e for job in jobs for e in job.encoded]
            out = np.concatenate([self._batch(rows[i:i + self.max_batch])
                                  for i in range(0, len(rows), self.max_batch)])
        except Exception as err:  # noqa: BLE001 - every caller of this pass gets it
            for job in jobs:
                job.future.set_exception(err)
            return
        ends = np.cumsum([len(job.encoded) for job in jobs])
        for job, end in zip(jobs, ends):
            job.future.set_result(out[end - len(job.encoded):end])

    def _batch(self, encoded: Sequence[tuple[list[int], list[int]]]) -> np.ndarray:
        """Scores of at most max_batch encoded examples (ids, token types), one forward pass."""
        n = len(encoded)
        length = _bucket(max(len(ids) for ids, _ in encoded), self.lengths)
        rows = _bucket(n, self.batches)
        ids = np.full((rows, length), self.tokenizer.pad_id, np.int32)
        types = np.zeros((rows, length), np.int32)
        lengths = np.zeros((rows,), np.int32)
        for i, (row, row_types) in enumerate(encoded):
            ids[i, :len(row)], types[i, :len(row)], lengths[i] = row, row_types, len(row)
        mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
        last = np.maximum(lengths - 1, 0).astype(np.int32)
        with self._lock, self.layout.context():
            scores = np.asarray(self._apply(self.params, ids, mask, types, last))[:n]
            self.forward_passes += 1
        if self.regression:
            return scores.astype(np.float32)
        scores = scores.astype(np.float32)
        exp = np.exp(scores - scores.max(axis=-1, keepdims=True))
        return exp / exp.sum(axis=-1, keepdims=True)

    def warmup(self) -> None:
        """Compiles the forward pass of every (batch, length) bucket."""
        for rows in self.batches:
            for length in self.lengths:
                zeros = np.zeros((rows, length), np.int32)
                with self._lock, self.layout.context():
                    jax.block_until_ready(self._apply(self.params, zeros, zeros + 1, zeros,
                                                      np.zeros((rows,), np.int32)))


def load_classifier(workdir: str, step: int | None = None, *, max_batch: int = 16,
                    max_len: int | None = None, layout: Layout | None = None) -> Classifier:
    """A `Classifier` for a classification workdir, its parameters placed by `layout`
    (default: the first device). ConfigError if DIR is not one, or has no checkpoint (at
    `step`)."""
    info = workdir_lib.read_run_info(workdir)
    if info is None or info.get("objective") != "classification":
        raise ConfigError(f"--workdir={workdir} is not a classification run (its run.json's "
                          "objective is not 'classification').")
    cfg = TransformerConfig(**info["model_config"])
    facts = read_run_facts(workdir, info)
    seq_len = int(max_len or info.get("seq_len") or cfg.max_len)
    if cfg.position == "learned" and seq_len > cfg.max_len:
        raise ConfigError(f"--max_len={seq_len} exceeds the model's max_len={cfg.max_len}.")
    if not info.get("vocab"):
        raise ConfigError(f"--workdir={workdir}: run.json names no tokenizer (vocab).")
    tokenizer = load_tokenizer(info["vocab"])
    model = SequenceClassifier(cfg, 1 if facts.task == "regression" else facts.num_labels,
                               head_dropout=0.0)
    layout = layout or Layout.single_device()
    ones = jnp.ones((1, 4), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), ones, ones, ones * 0,
                                              jnp.zeros((1,), jnp.int32))["params"])
    shardings = partitioning.logical_to_shardings(boxed, layout.mesh, layout.rules)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.unbox(boxed), shardings)
    checkpoints = storage.join(workdir, "checkpoints")
    if not storage.isdir(checkpoints):
        raise ConfigError(f"--workdir={workdir} has no checkpoints/ yet; train it until a "
                          "checkpoint is saved.")
    params = restore_workdir_params(workdir, step, abstract)
    return Classifier(model, params, tokenizer, facts, seq_len=seq_len, max_batch=max_batch,
                      layout=layout)
