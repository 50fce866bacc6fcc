"""Fine-tuning objective: sequence classification or regression on labelled examples, with
the `research.models.heads.SequenceClassifier` head."""

from __future__ import annotations

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from research.models.heads import TASKS, SequenceClassifier
from research.models.transformer import TransformerConfig


@gin.configurable
class ClassificationObjective:
    """Single-sentence / sentence-pair classification or regression on labelled examples.

    Args:
      task: 'binary' (accuracy, F1, MCC), 'multiclass' (accuracy, macro F1, MCC) or
        'regression' (Pearson, Spearman; MSE loss on one output).
      num_labels: classes (ignored for regression).
      text_fields: one column (single sentence) or two (a pair), e.g. ('text_a', 'text_b').
      label_field: the label column.
      label_names: string labels in id order; None = ints in the data, or the sorted set of
        string labels found in the training data.
      head_dropout: dropout before the classifier.
      metric: the task metric that picks the best checkpoint (default: accuracy, or
        pearson for regression).
    """

    name = "classification"
    required_special_pieces = ("pad",)

    def __init__(self, task: str = "binary", num_labels: int = 2,
                 text_fields: tuple[str, ...] = ("text",), label_field: str = "label",
                 label_names: tuple[str, ...] | None = None, head_dropout: float = 0.1,
                 metric: str | None = None):
        if task not in TASKS:
            raise ValueError(f"ClassificationObjective.task={task!r}; choose one of {TASKS}.")
        if task == "binary" and num_labels != 2:
            raise ValueError("task='binary' needs num_labels=2; use task='multiclass'.")
        self.task, self.num_labels = task, num_labels
        self.text_fields, self.label_field = tuple(text_fields), label_field
        self.label_names = list(label_names) if label_names else None
        self.head_dropout = head_dropout
        self.metric = metric or ("pearson" if task == "regression" else "accuracy")
        self.style = "encoder"

    @property
    def regression(self) -> bool:
        return self.task == "regression"

    def make_model(self, cfg: TransformerConfig) -> nn.Module:
        self.style = "decoder" if cfg.causal else "encoder"
        return SequenceClassifier(cfg, 1 if self.regression else self.num_labels,
                                  self.head_dropout)

    # ------------------------------------------------------------------ data ---------------

    def open_source(self, spec: str, *, role: str = "train"):
        """Examples of one split; eval/test reuse the training label names."""
        from research.data.classification import load_examples
        examples = load_examples(spec, text_fields=self.text_fields, label_field=self.label_field,
                                 label_names=self.label_names, regression=self.regression,
                                 allow_unlabeled=role == "test")
        if role == "train" and self.label_names is None and examples.label_names:
            self.label_names = list(examples.label_names)
        if not self.regression and self.label_names and len(self.label_names) != self.num_labels:
            raise ValueError(f"the data has {len(self.label_names)} label names "
                             f"{self.label_names} but ClassificationObjective.num_labels="
                             f"{self.num_labels}.")
        return examples

    def steps_per_epoch(self, source, global_batch_size: int) -> int:
        return -(-len(source.texts) // global_batch_size)

    def make_iterator(self, source, tokenizer, **kwargs):
        from research.data.classification import make_classification_iterator
        needed = ("cls", "sep") if self.style == "encoder" else ("bos", "eos", "sep")
        tokenizer.require_special(*needed)
        return make_classification_iterator(source, tokenizer, style=self.style, **kwargs)

    def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        ints = np.zeros((batch_size, seq_len), np.int32)
        return {"input_ids": ints, "input_mask": ints, "token_type_ids": ints,
                "label": np.zeros((batch_size,), np.float32 if self.regression else np.int32),
                "weight": np.zeros((batch_size,), np.float32),
                "index": np.zeros((batch_size,), np.int32),
                "last_index": np.zeros((batch_size,), np.int32)}

    # ------------------------------------------------------------------ model --------------

    def init(self, model, rngs, batch):
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
        from research.objectives.task_metrics import task_metrics
        return task_metrics(self.task, predictions, labels)

    def format_prediction(self, value: float) -> str:
        if self.regression:
            return f"{value:.6g}"
        label = int(value)
        return self.label_names[label] if self.label_names else str(label)
