"""Fine-tuning objective: sequence classification or regression on labelled examples, with
the `research.models.heads.SequenceClassifier` head. The interface is `objectives/base.py`.

Two facts come from outside the gin config, each in its own step that returns a new objective
(nothing mutates; skipping a step fails with an error naming it):
  with_training_data(train_examples)  label names (the sorted string labels of the training
                                      split, unless `label_names` is set); eval/test splits
                                      are then read with the same names, so ids agree
  for_model(cfg)                      the input layout: 'encoder' ([CLS] a [SEP] b [SEP]) for
                                      a bidirectional model, 'decoder' for a causal one
"""

from __future__ import annotations

import copy

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from research.data.classification import Examples, load_examples, make_classification_iterator
from research.errors import ConfigError
from research.models.heads import TASKS, SequenceClassifier
from research.models.transformer import TransformerConfig
from research.objectives.base import Batch, Objective
from research.objectives.task_metrics import task_metrics

# The tokenizer pieces each input layout needs (checked when the iterator is made); a
# decoder needs its separator only between the two texts of a pair (Llama has none).
STYLE_PIECES = {"encoder": ("cls", "sep"), "decoder": ("bos", "eos")}
PAIR_PIECES = {"encoder": (), "decoder": ("sep",)}


@gin.configurable
class ClassificationObjective(Objective):
    """Single-sentence / sentence-pair classification or regression on labelled examples.

    Args:
      task: 'binary' (accuracy, F1, MCC), 'multiclass' (accuracy, macro F1, MCC) or
        'regression' (Pearson, Spearman; MSE loss on one output).
      num_labels: classes (ignored for regression).
      text_fields: one column (single sentence) or two (a pair), e.g. ('text_a', 'text_b').
      label_field: the label column.
      label_names: string labels in id order; None = ints in the data, or the sorted set of
        string labels found in the training data (`with_training_data`).
      head_dropout: dropout before the classifier.
      metric: the task metric that picks the best checkpoint (default: accuracy, or
        pearson for regression).
    """

    name = "classification"
    required_special_pieces = ("pad",)
    has_predictions = True

    def __init__(self, task: str = "binary", num_labels: int = 2,
                 text_fields: tuple[str, ...] = ("text",), label_field: str = "label",
                 label_names: tuple[str, ...] | None = None, head_dropout: float = 0.1,
                 metric: str | None = None):
        if task not in TASKS:
            raise ConfigError(f"ClassificationObjective.task={task!r}; choose one of {TASKS}.")
        if task == "binary" and num_labels != 2:
            raise ConfigError("ClassificationObjective.task='binary' needs num_labels=2; use "
                              "task='multiclass' for more classes.")
        self.task, self.num_labels = task, num_labels
        self.text_fields, self.label_field = tuple(text_fields), label_field
        self.label_names = list(label_names) if label_names else None
        self.head_dropout = head_dropout
        self.metric = metric or ("pearson" if task == "regression" else "accuracy")
        self.style: str | None = None  # set by for_model
        self.read_training_data = False  # set by with_training_data

    def _replace(self, **changes) -> "ClassificationObjective":
        """A copy with `changes` (not through __init__, so gin records nothing new)."""
        new = copy.copy(self)
        new.__dict__.update(changes)
        return new

    @property
    def regression(self) -> bool:
        return self.task == "regression"

    def for_model(self, cfg: TransformerConfig) -> "ClassificationObjective":
        """The input layout of `cfg`'s stack: 'decoder' if causal, else 'encoder'."""
        return self._replace(style="decoder" if cfg.causal else "encoder")

    def make_model(self, cfg: TransformerConfig) -> nn.Module:
        return SequenceClassifier(cfg, 1 if self.regression else self.num_labels,
                                  self.head_dropout)

    # ------------------------------------------------------------------ data ---------------

    def open_source(self, spec: str, *, role: str = "train") -> Examples:
        """Examples of one split; eval/test (read after `with_training_data`) use the training
        label names, and test rows may be unlabelled."""
        if role != "train" and not self.read_training_data:
            raise RuntimeError("ClassificationObjective: open the training split and use "
                               "objective.with_training_data(source) before opening "
                               f"{role} data, so that label ids agree.")
        return load_examples(spec, text_fields=self.text_fields, label_field=self.label_field,
                             label_names=self.label_names, regression=self.regression,
                             allow_unlabeled=role == "test")

    def with_training_data(self, source: Examples) -> "ClassificationObjective":
        """Label names: `label_names` if set, else those found in the training examples."""
        names = self.label_names
        if names is None and source.label_names:
            names = list(source.label_names)
        if not self.regression and names and len(names) != self.num_labels:
            raise ConfigError(f"the data has {len(names)} label names {names} but "
                              f"ClassificationObjective.num_labels={self.num_labels}; set "
                              f"--gin.ClassificationObjective.num_labels={len(names)} (and "
                              "task='multiclass' for more than 2).")
        return self._replace(label_names=names, read_training_data=True)

    def steps_per_epoch(self, source: Examples, global_batch_size: int) -> int:
        return -(-len(source.texts) // global_batch_size)

    def make_iterator(self, source, tokenizer, **kwargs):
        """`make_classification_iterator` in this objective's input layout (`for_model`)."""
        if self.style is None:
            raise RuntimeError("ClassificationObjective: call objective.for_model(cfg) before "
                               "make_iterator (the input layout depends on the model).")
        pair = PAIR_PIECES[self.style] if len(self.text_fields) > 1 else ()
        tokenizer.require_special(*STYLE_PIECES[self.style], *pair)
        return make_classification_iterator(source, tokenizer, style=self.style, **kwargs)

    def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        ints = np.zeros((batch_size, seq_len), np.int32)
        return {"input_ids": ints, "input_mask": ints, "token_type_ids": ints,
                "label": np.zeros((batch_size,), np.float32 if self.regression else np.int32),
                "weight": np.zeros((batch_size,), np.float32),
                "index": np.zeros((batch_size,), np.int32),
                "last_index": np.zeros((batch_size,), np.int32)}

    # ------------------------------------------------------------------ model --------------

    def init(self, model: nn.Module, rngs: dict[str, jax.Array], batch: Batch):
        return model.init(rngs, batch["input_ids"], batch["input_mask"], batch["token_type_ids"],
                          batch["last_index"])

    def _scores(self, model, params, batch, rng, deterministic):
        return model.apply({"params": params}, batch["input_ids"], batch["input_mask"],
                           batch["token_type_ids"], batch["last_index"],
                           deterministic=deterministic, rngs={"dropout": rng})

    def normalizers(self, batch):
        return {"examples": jnp.maximum(jnp.sum(batch["weight"]), 1.0)}

    def loss(self, model, params, batch, rng, normalizers, deterministic):
        scores = self._scores(model, params, batch, rng, deterministic)
        w = batch["weight"].astype(jnp.float32)
        count = jnp.sum(w)
        if self.regression:
            per_example = (scores[:, 0] - batch["label"].astype(jnp.float32)) ** 2
            metrics = {"loss": (jnp.sum(per_example * w), count)}
        else:
            logp = jax.nn.log_softmax(scores)
            label = batch["label"].astype(jnp.int32)
            per_example = -jnp.take_along_axis(logp, label[:, None], axis=1)[:, 0]
            correct = (jnp.argmax(scores, -1) == label).astype(jnp.float32)
            metrics = {"loss": (jnp.sum(per_example * w), count),
                       "accuracy": (jnp.sum(correct * w), count)}
        return jnp.sum(per_example * w) / normalizers["examples"], metrics

    def predict(self, model, params, batch) -> dict[str, jax.Array]:
        """Per-example outputs: prediction (class id or value) float32[B]."""
        scores = self._scores(model, params, batch, jax.random.key(0), True)
        pred = scores[:, 0] if self.regression else jnp.argmax(scores, -1).astype(jnp.float32)
        return {"prediction": pred}

    def task_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return task_metrics(self.task, predictions, labels)

    def format_prediction(self, value: float) -> str:
        """The value (regression), or the class name (or id) of a class id."""
        if not self.read_training_data:
            raise RuntimeError("ClassificationObjective: with_training_data(source) first "
                               "(predictions are written with the training label names).")
        if self.regression:
            return f"{value:.6g}"
        label = int(value)
        return self.label_names[label] if self.label_names else str(label)
