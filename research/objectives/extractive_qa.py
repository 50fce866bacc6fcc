"""Fine-tuning objective: extractive question answering (SQuAD v1.1 / v2.0) with the
`research.models.heads.SpanExtractor` head. The interface is `objectives/base.py`.

Data: `squad:PATH` (`research.data.squad`), cut into document-stride windows of SEQ_LEN
pieces. Loss (run_squad.py): the mean over windows of (CE(start) + CE(end)) / 2, softmax over
all positions; a window without the answer points both targets at [CLS] (position 0).

Evaluation: the predict step returns each window's start and end logits; `task_metrics` runs
the n-best span search over all windows of each question (`span_search`, with v2.0's null
answer and `null_score_diff_threshold`) and scores the answers as the official script does
(`squad_metrics`): eval/exact_match and eval/f1 in percent (v2.0 also has_ans_* / no_ans_*).
The windows scored are those of the last one-pass (repeat=False) iterator this objective made,
i.e. the eval split's. A training "epoch" counts questions (a long context has several
windows, so an epoch of windows is a little longer). TEST_DATA (questions whose answers may be
missing) gets DIR/predictions.json, {question id: answer}, as the official script reads it.
"""

from __future__ import annotations

import copy
import json

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from research.data.squad import QAExamples, QAFeatures, QAIterator, load_squad, make_features
from research.errors import ConfigError
from research.models.heads import SpanExtractor
from research.models.transformer import TransformerConfig
from research.objectives.base import Batch, Objective
from research.objectives.span_search import predict_answers
from research.objectives.squad_metrics import squad_scores


@gin.configurable
class ExtractiveQAObjective(Objective):
    """Start/end span prediction over [CLS] question [SEP] context-window [SEP] inputs.

    Args:
      doc_stride: pieces between the starts of consecutive windows of a long context.
      max_query_length: question pieces kept (the rest is cut).
      n_best_size: start and end candidates per window, and answers kept per question.
      max_answer_length: the longest answer span, in pieces.
      version_2_with_negative: SQuAD v2.0 scoring and null answers; None = v2.0 when the
        training data has an unanswerable question.
      null_score_diff_threshold: v2.0 answers "" when null score - best span score exceeds it.
    """

    name = "extractive_qa"
    required_special_pieces = ("pad", "cls", "sep")
    has_predictions = True

    def __init__(self, doc_stride: int = 128, max_query_length: int = 64,
                 n_best_size: int = 20, max_answer_length: int = 30,
                 version_2_with_negative: bool | None = None,
                 null_score_diff_threshold: float = 0.0):
        if min(doc_stride, max_query_length, n_best_size, max_answer_length) < 1:
            raise ConfigError("ExtractiveQAObjective: doc_stride, max_query_length, n_best_size "
                              "and max_answer_length must all be >= 1.")
        self.doc_stride, self.max_query_length = int(doc_stride), int(max_query_length)
        self.n_best_size, self.max_answer_length = int(n_best_size), int(max_answer_length)
        self.version_2 = version_2_with_negative
        self.null_score_diff_threshold = float(null_score_diff_threshold)
        self.scored_features: QAFeatures | None = None  # set by make_iterator(repeat=False)

    def _replace(self, **changes) -> "ExtractiveQAObjective":
        new = copy.copy(self)
        new.__dict__.update(changes)
        return new

    # ------------------------------------------------------------------ data ---------------

    def open_source(self, spec: str, *, role: str = "train") -> QAExamples:
        source = load_squad(spec, allow_unlabeled=role == "test")
        if self.version_2 is False and source.has_impossible:
            raise ConfigError(f"{source.name} has unanswerable questions (is_impossible) but "
                              "ExtractiveQAObjective.version_2_with_negative = False; set it to "
                              "True (or None: decided by TRAIN_DATA).")
        return source

    def with_training_data(self, source: QAExamples) -> "ExtractiveQAObjective":
        """SQuAD v2.0 handling when unset and the training data has unanswerable questions."""
        version_2 = source.has_impossible if self.version_2 is None else self.version_2
        return self._replace(version_2=bool(version_2))

    def for_model(self, cfg: TransformerConfig) -> "ExtractiveQAObjective":
        if cfg.causal:
            raise ConfigError("ExtractiveQAObjective needs a bidirectional encoder: set "
                              "TransformerConfig.causal = False (configs/models/bert_*.gin do).")
        return self

    def steps_per_epoch(self, source: QAExamples, global_batch_size: int) -> int:
        return -(-len(source) // global_batch_size)

    def features(self, source: QAExamples, tokenizer, seq_len: int) -> QAFeatures:
        """The windows of `source` (computed once per tokenizer and window settings)."""
        cache = source.__dict__.setdefault("_features", {})
        key = (id(tokenizer), seq_len, self.doc_stride, self.max_query_length)
        if key not in cache:
            cache[key] = make_features(source, tokenizer, max_seq_length=seq_len,
                                       doc_stride=self.doc_stride,
                                       max_query_length=self.max_query_length)
        return cache[key]

    def make_iterator(self, source, tokenizer, *, seq_len: int, global_batch_size: int,
                      seed: int, process_index: int = 0, process_count: int = 1,
                      repeat: bool = True, shuffle: bool | None = None) -> QAIterator:
        """Batches of windows (`QAIterator`); a one-pass iterator's windows become the ones
        `task_metrics` scores."""
        tokenizer.require_special("cls", "sep")
        features = self.features(source, tokenizer, seq_len)
        if not repeat:
            self.scored_features = features
        return QAIterator(features, tokenizer, seq_len=seq_len,
                          global_batch_size=global_batch_size, seed=seed,
                          process_index=process_index, process_count=process_count,
                          repeat=repeat, shuffle=shuffle)

    def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        ints = np.zeros((batch_size, seq_len), np.int32)
        rows = np.zeros((batch_size,), np.int32)
        return {"input_ids": ints, "input_mask": ints, "token_type_ids": ints,
                "start_positions": rows, "end_positions": rows, "label": rows,
                "weight": np.zeros((batch_size,), np.float32), "index": rows}

    # ------------------------------------------------------------------ model --------------

    def make_model(self, cfg: TransformerConfig) -> nn.Module:
        return SpanExtractor(cfg)

    def init(self, model: nn.Module, rngs: dict[str, jax.Array], batch: Batch):
        return model.init(rngs, batch["input_ids"], batch["input_mask"], batch["token_type_ids"])

    def _logits(self, model, params, batch, rng, deterministic) -> tuple[jax.Array, jax.Array]:
        return model.apply({"params": params}, batch["input_ids"], batch["input_mask"],
                           batch["token_type_ids"], deterministic=deterministic,
                           rngs={"dropout": rng})

    def normalizers(self, batch):
        return {"examples": jnp.maximum(jnp.sum(batch["weight"]), 1.0)}

    def loss(self, model, params, batch, rng, normalizers, deterministic):
        start, end = self._logits(model, params, batch, rng, deterministic)
        w = batch["weight"].astype(jnp.float32)
        count = jnp.sum(w)

        def cross_entropy(logits, target):
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.take_along_axis(logp, target[:, None].astype(jnp.int32), axis=1)[:, 0]

        per_window = 0.5 * (cross_entropy(start, batch["start_positions"])
                            + cross_entropy(end, batch["end_positions"]))
        exact = ((jnp.argmax(start, -1) == batch["start_positions"])
                 & (jnp.argmax(end, -1) == batch["end_positions"])).astype(jnp.float32)
        metrics = {"loss": (jnp.sum(per_window * w), count),
                   "span_accuracy": (jnp.sum(exact * w), count)}
        return jnp.sum(per_window * w) / normalizers["examples"], metrics

    def predict(self, model, params, batch) -> dict[str, jax.Array]:
        """{"prediction": float32[B, 2, L]}: each window's start (row 0) and end (1) logits."""
        start, end = self._logits(model, params, batch, jax.random.key(0), True)
        return {"prediction": jnp.stack([start, end], axis=1)}

    def answers(self, predictions: np.ndarray, features: QAFeatures) -> dict[str, str]:
        """Question id -> answer text ("" = none) from float[F, 2, L] window logits."""
        predictions = np.asarray(predictions, np.float32)
        return predict_answers(predictions[:, 0], predictions[:, 1], features,
                               n_best_size=self.n_best_size,
                               max_answer_length=self.max_answer_length,
                               version_2=bool(self.version_2),
                               null_score_diff_threshold=self.null_score_diff_threshold)

    def task_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """exact_match and f1 (percent; v2.0 also has_ans_* / no_ans_*) of the answers found
        in `predictions` [F, 2, L] for the scored windows; `labels` are the window indices."""
        features = self.scored_features
        if features is None:
            raise RuntimeError("ExtractiveQAObjective: make a repeat=False iterator of the split "
                               "first (its windows are the ones scored).")
        labels = np.asarray(labels)
        if len(labels) != len(features) or not np.array_equal(labels, np.arange(len(features))):
            raise ValueError(f"ExtractiveQAObjective: got predictions for {len(labels)} windows, "
                             f"expected each of the {len(features)} windows once, in order.")
        return squad_scores(features.examples.gold(), self.answers(predictions, features),
                            version_2=bool(self.version_2))

    def prediction_file(self, predictions: dict[str, np.ndarray]) -> tuple[str, str]:
        """predictions.json, {question id: answer text ("" = no answer)}: the file the
        official SQuAD evaluation script reads, from the test split's window logits
        (`predictions["prediction"]` float[F, 2, L], windows in order)."""
        features = self.scored_features
        logits = np.asarray(predictions["prediction"])
        if features is None or len(logits) != len(features):
            raise ValueError("ExtractiveQAObjective: predictions.json needs the logits of every "
                             "window of the test split, in order (a repeat=False iterator's).")
        answers = self.answers(logits, features)
        return "predictions.json", json.dumps(answers, indent=1, ensure_ascii=False) + "\n"
