"""Fine-tuning objective: multiple choice (SWAG style) with the
`research.models.heads.MultipleChoiceClassifier` head on a BERT-style encoder, as BERT's SWAG
recipe and HF `run_swag` / `BertForMultipleChoice`. The interface is `objectives/base.py`.

Data: `jsonl:PATH` with named fields (`research.data.multiple_choice`; defaults SWAG's
`sent1`, `sent2`, `ending0..3`, `label`). Each of an example's N choices is encoded as
[CLS] context [SEP] question ending [SEP]; the batch is [B, N, L].

Loss: cross-entropy of the softmax over each example's N choice logits (mean over examples).
Metrics: eval/loss and eval/accuracy from the eval step, and task metric `accuracy` over the
whole eval split; TEST_DATA predictions are the index of the chosen ending.
"""

from __future__ import annotations

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from research.data.multiple_choice import (SWAG_ENDINGS, ChoiceExamples, MultipleChoiceIterator,
                                           load_multiple_choice)
from research.errors import ConfigError
from research.models.heads import MultipleChoiceClassifier
from research.models.transformer import TransformerConfig
from research.objectives.base import Batch, Objective


def choice_loss(logits: jax.Array, label: jax.Array, weight: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """(per-example cross-entropy float32[B], per-example correct float32[B]) of choice
    logits float32[B, N] and labels int[B]; both times `weight` float32[B]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    label = label.astype(jnp.int32)
    nll = -jnp.take_along_axis(logp, label[:, None], axis=1)[:, 0]
    correct = (jnp.argmax(logits, -1) == label).astype(jnp.float32)
    return nll * weight, correct * weight


@gin.configurable
class MultipleChoiceObjective(Objective):
    """Picks the right ending of N, with a softmax over the choices' scores.

    Args:
      context_field: the context (SWAG: 'sent1').
      question_field: prefixed to every ending with a space (SWAG: 'sent2', the start of the
        next sentence); None = the endings alone.
      ending_fields: one field per choice (SWAG: 'ending0'..'ending3'), or one field holding
        a list of endings (e.g. ('endings',)).
      label_field: the index of the right ending.
      head_dropout: dropout on the pooled [CLS] before the classifier (BERT: 0.1).
    """

    name = "multiple_choice"
    required_special_pieces = ("pad", "cls", "sep")
    has_predictions = True

    def __init__(self, context_field: str = "sent1", question_field: str | None = "sent2",
                 ending_fields: tuple[str, ...] = SWAG_ENDINGS, label_field: str = "label",
                 head_dropout: float = 0.1):
        self.context_field, self.question_field = context_field, question_field
        self.ending_fields, self.label_field = tuple(ending_fields), label_field
        self.head_dropout = head_dropout
        self.num_choices: int | None = None  # set by with_training_data

    # ------------------------------------------------------------------ data ---------------

    def open_source(self, spec: str, *, role: str = "train") -> ChoiceExamples:
        source = load_multiple_choice(spec, context_field=self.context_field,
                                      question_field=self.question_field,
                                      ending_fields=self.ending_fields,
                                      label_field=self.label_field,
                                      allow_unlabeled=role == "test")
        if self.num_choices is not None and source.num_choices != self.num_choices:
            raise ConfigError(f"{source.name} has {source.num_choices} choices per example but "
                              f"the training data has {self.num_choices}; they must agree.")
        return source

    def with_training_data(self, source: ChoiceExamples) -> "MultipleChoiceObjective":
        """The number of choices: that of the training examples."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__, num_choices=source.num_choices)
        return new

    def for_model(self, cfg: TransformerConfig) -> "MultipleChoiceObjective":
        if cfg.causal:
            raise ConfigError("MultipleChoiceObjective scores [CLS] context [SEP] ending [SEP] "
                              "with a bidirectional encoder: use a BERT model config "
                              "(TransformerConfig.causal = False, e.g. "
                              "configs/models/bert_tiny.gin).")
        return self

    def steps_per_epoch(self, source: ChoiceExamples, global_batch_size: int) -> int:
        return -(-len(source) // global_batch_size)

    def make_iterator(self, source, tokenizer, **kwargs) -> MultipleChoiceIterator:
        """Batches of [b, N, L] choices (`MultipleChoiceIterator`)."""
        tokenizer.require_special("cls", "sep")
        return MultipleChoiceIterator(source, tokenizer, **kwargs)

    def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        if self.num_choices is None:
            raise RuntimeError("MultipleChoiceObjective: call objective.with_training_data("
                               "source) first (the number of choices comes from the data).")
        ints = np.zeros((batch_size, self.num_choices, seq_len), np.int32)
        rows = np.zeros((batch_size,), np.int32)
        return {"input_ids": ints, "input_mask": ints, "token_type_ids": ints, "label": rows,
                "weight": np.zeros((batch_size,), np.float32), "index": rows}

    # ------------------------------------------------------------------ model --------------

    def make_model(self, cfg: TransformerConfig) -> nn.Module:
        return MultipleChoiceClassifier(cfg, self.head_dropout)

    def init(self, model: nn.Module, rngs: dict[str, jax.Array], batch: Batch):
        return model.init(rngs, batch["input_ids"], batch["input_mask"], batch["token_type_ids"])

    def _logits(self, model, params, batch, rng, deterministic) -> jax.Array:
        return model.apply({"params": params}, batch["input_ids"], batch["input_mask"],
                           batch["token_type_ids"], deterministic=deterministic,
                           rngs={"dropout": rng})

    def normalizers(self, batch):
        return {"examples": jnp.maximum(jnp.sum(batch["weight"]), 1.0)}

    def loss(self, model, params, batch, rng, normalizers, deterministic):
        logits = self._logits(model, params, batch, rng, deterministic)
        w = batch["weight"].astype(jnp.float32)
        nll, correct = choice_loss(logits, batch["label"], w)
        count = jnp.sum(w)
        metrics = {"loss": (jnp.sum(nll), count), "accuracy": (jnp.sum(correct), count)}
        return jnp.sum(nll) / normalizers["examples"], metrics

    def predict(self, model, params, batch) -> dict[str, jax.Array]:
        """{"prediction": float32[B]}: the index of the highest-scoring choice."""
        logits = self._logits(model, params, batch, jax.random.key(0), True)
        return {"prediction": jnp.argmax(logits, -1).astype(jnp.float32)}

    def task_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """accuracy: the fraction of examples whose chosen ending is the labelled one."""
        predictions, labels = np.asarray(predictions), np.asarray(labels)
        if not len(labels):
            raise ValueError("task_metrics: no examples to score.")
        if (labels < 0).any():
            raise ValueError("task_metrics: some examples have no label (-1); eval data must "
                             "be fully labelled.")
        return {"accuracy": float(np.mean(predictions.astype(np.int64) == labels))}

    def format_prediction(self, value: float) -> str:
        """The index of the chosen ending."""
        return str(int(value))
