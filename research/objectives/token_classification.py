"""Fine-tuning objective: token classification (NER, POS tagging, chunking) on word-tagged
sentences (`conll:PATH`), with the `research.models.heads.TokenClassifier` head on a BERT-style
encoder. The interface is `objectives/base.py`; the data and label alignment are
`research.data.conll` and `research.data.token_classification`.

The label vocabulary comes from the training split (`with_training_data`: its sorted distinct
labels, unless `label_names` is set); eval / test splits are read with it, so ids agree.
Training and the eval loss use the first piece of every word (the other pieces have weight
0); task metrics are per word: `accuracy`, and for BIO / IOB2 / IOBES labels the entity-level
`precision`, `recall`, `f1` exactly as seqeval computes them (`seqeval_metrics`).
"""

from __future__ import annotations

import copy
import logging

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from research.data.conll import TaggedSentences, load_conll
from research.data.token_classification import (IGNORE, coverage,
                                                make_token_classification_iterator,
                                                word_predictions)
from research.errors import ConfigError
from research.models.heads import TokenClassifier
from research.models.transformer import TransformerConfig
from research.objectives.base import Batch, Objective
from research.objectives.seqeval_metrics import entity_scores, is_entity_scheme

log = logging.getLogger(__name__)
_COVERAGE_CHECKED: set[tuple[str, int]] = set()  # (split name, seq_len) already reported


@gin.configurable
class TokenClassificationObjective(Objective):
    """Per-word tagging with labels aligned to the first sub-word piece of each word.

    Args:
      label_names: the label vocabulary in id order; None = the sorted distinct labels of
        the training split.
      head_dropout: dropout on the encoder's final hidden states before the classifier
        (BERT's run_ner: hidden_dropout_prob, 0.1).
    """

    name = "token_classification"
    required_special_pieces = ("pad", "cls", "sep")
    has_predictions = True

    def __init__(self, label_names: tuple[str, ...] | None = None, head_dropout: float = 0.1):
        self.label_names = list(label_names) if label_names else None
        self.head_dropout = head_dropout
        self.read_training_data = False  # set by with_training_data

    def _replace(self, **changes) -> "TokenClassificationObjective":
        """A copy with `changes` (not through __init__, so gin records nothing new)."""
        new = copy.copy(self)
        new.__dict__.update(changes)
        return new

    @property
    def num_labels(self) -> int:
        if not self.label_names:
            raise RuntimeError("TokenClassificationObjective: call "
                               "objective.with_training_data(source) first (the label "
                               "vocabulary comes from the training data).")
        return len(self.label_names)

    # ------------------------------------------------------------------ data ---------------

    def open_source(self, spec: str, *, role: str = "train") -> TaggedSentences:
        """The sentences of one split; eval/test (after `with_training_data`) use the training
        label vocabulary, and test words may be unlabeled."""
        if role != "train" and not self.read_training_data:
            raise RuntimeError("TokenClassificationObjective: open the training split and use "
                               "objective.with_training_data(source) before opening "
                               f"{role} data, so that label ids agree.")
        return load_conll(spec, label_names=self.label_names, allow_unlabeled=role == "test")

    def with_training_data(self, source: TaggedSentences) -> "TokenClassificationObjective":
        """The label vocabulary: `label_names` if set, else the training split's."""
        names = self.label_names or list(source.label_names)
        if len(names) < 2:
            raise ConfigError(f"{source.name} has the labels {names}: token classification "
                              "needs at least 2 (is the label the last column?).")
        log.info("Token classification labels (id order): %s", names)
        return self._replace(label_names=names, read_training_data=True)

    def for_model(self, cfg: TransformerConfig) -> "TokenClassificationObjective":
        if cfg.causal:
            raise ConfigError("TokenClassificationObjective tags words with a bidirectional "
                              "encoder: use a BERT model config (TransformerConfig.causal = "
                              "False, e.g. configs/models/bert_tiny.gin).")
        return self

    def steps_per_epoch(self, source: TaggedSentences, global_batch_size: int) -> int:
        return -(-len(source) // global_batch_size)

    def make_iterator(self, source, tokenizer, **kwargs):
        """`make_token_classification_iterator`; warns (once per split and length) how many
        words the sequence length cuts off."""
        key = (source.name, kwargs["seq_len"])
        if key in _COVERAGE_CHECKED:
            return make_token_classification_iterator(source, tokenizer, **kwargs)
        _COVERAGE_CHECKED.add(key)
        kept, total = coverage(source, tokenizer, kwargs["seq_len"])
        if kept < total:
            log.warning("%s: %d of %d words get no piece within seq_len=%d (cut off) and are "
                        "neither trained on nor scored; raise SEQ_LEN to keep them.",
                        source.name, total - kept, total, kwargs["seq_len"])
        return make_token_classification_iterator(source, tokenizer, **kwargs)

    def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        ints = np.zeros((batch_size, seq_len), np.int32)
        return {"input_ids": ints, "input_mask": ints, "token_type_ids": ints,
                "label": ints, "word_start": ints,
                "weight": np.zeros((batch_size,), np.float32),
                "index": np.zeros((batch_size,), np.int32)}

    # ------------------------------------------------------------------ model --------------

    def make_model(self, cfg: TransformerConfig) -> nn.Module:
        return TokenClassifier(cfg, self.num_labels, self.head_dropout)

    def init(self, model: nn.Module, rngs: dict[str, jax.Array], batch: Batch):
        return model.init(rngs, batch["input_ids"], batch["input_mask"], batch["token_type_ids"])

    def _logits(self, model, params, batch, rng, deterministic):
        return model.apply({"params": params}, batch["input_ids"], batch["input_mask"],
                           batch["token_type_ids"], deterministic=deterministic,
                           rngs={"dropout": rng})

    @staticmethod
    def _token_weights(batch) -> jax.Array:
        """float32 [B, L]: 1 at the first piece of each labelled word of a real row."""
        return ((batch["label"] != IGNORE) * batch["weight"][:, None]).astype(jnp.float32)

    def normalizers(self, batch):
        return {"words": jnp.maximum(jnp.sum(self._token_weights(batch)), 1.0)}

    def loss(self, model, params, batch, rng, normalizers, deterministic):
        logits = self._logits(model, params, batch, rng, deterministic)  # [B, L, C]
        w = self._token_weights(batch)
        label = jnp.maximum(batch["label"], 0).astype(jnp.int32)
        logp = jax.nn.log_softmax(logits)
        per_word = -jnp.take_along_axis(logp, label[..., None], axis=-1)[..., 0]
        correct = (jnp.argmax(logits, -1) == label).astype(jnp.float32)
        count = jnp.sum(w)
        metrics = {"loss": (jnp.sum(per_word * w), count),
                   "accuracy": (jnp.sum(correct * w), count)}
        return jnp.sum(per_word * w) / normalizers["words"], metrics

    # ------------------------------------------------------------------ predictions --------

    def predict(self, model, params, batch) -> dict[str, jax.Array]:
        """prediction int32[B, L]: the predicted label id at the first piece of each word,
        -1 elsewhere (`word_predictions` reads a row's words back)."""
        logits = self._logits(model, params, batch, jax.random.key(0), True)
        pred = jnp.argmax(logits, -1).astype(jnp.int32)
        return {"prediction": jnp.where(batch["word_start"] > 0, pred, IGNORE)}

    def task_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Per-word metrics of whole-split predictions and labels, both int[N, L] (-1 off
        the words): accuracy, and entity precision / recall / F1 for BIO / IOBES labels."""
        names = self.label_names
        predictions, labels = np.asarray(predictions), np.asarray(labels)
        starts = predictions != IGNORE
        y_pred = [[names[i] for i in word_predictions(p, s)] for p, s in zip(predictions, starts)]
        y_true = [[names[i] if i >= 0 else None for i in word_predictions(t, s)]
                  for t, s in zip(labels, starts)]
        if any(None in sentence for sentence in y_true):
            raise ValueError("task_metrics: some scored words have no label (-1); eval data "
                             "must be fully labelled.")
        words = sum(len(s) for s in y_true)
        if not words:
            raise ValueError("task_metrics: no words to score.")
        correct = sum(t == p for ts, ps in zip(y_true, y_pred) for t, p in zip(ts, ps))
        out = {"accuracy": correct / words}
        if is_entity_scheme(names):
            out.update(entity_scores(y_true, y_pred))
        return out

    def format_prediction(self, value) -> str:
        """A sentence's predicted labels (int[L] row of `predict`), space separated, one per
        word that fits in seq_len."""
        if not self.read_training_data:
            raise RuntimeError("TokenClassificationObjective: with_training_data(source) first "
                               "(predictions are written with the training label names).")
        row = np.asarray(value).reshape(-1)
        return " ".join(self.label_names[int(i)] for i in row if i != IGNORE)
