"""The BERT pretraining objective: masked LM (+ next-sentence prediction) as in
google-research/bert `run_pretraining.py`; the model is `research.models.bert.BertPretrainer`.
The interface is `objectives/base.py`."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.data.bert_pretraining import make_bert_pretraining_iterator
from research.errors import ConfigError
from research.models import flops
from research.models.bert import BertPretrainer
from research.models.transformer import TransformerConfig
from research.objectives.base import Objective
from research.objectives.losses import MetricSums

Array = jax.Array

MLM_EPSILON = 1e-5  # run_pretraining.py: denominator = sum(label_weights) + 1e-5


@gin.configurable
@dataclasses.dataclass(frozen=True)
class BertPretrainingObjective(Objective):
    """MLM (+ NSP) pretraining as in google-research/bert run_pretraining.py.

    Knobs (gin: `BertPretrainingObjective.next_sentence = False`):
      next_sentence: add the NSP task (`[CLS] A [SEP] B [SEP]` pairs). False = MLM only on
        full-length packed `[CLS] x [SEP]` segments (RoBERTa-style); no NSP loss or metrics.
      max_predictions_per_seq: P (20 for L=128 in the reference, 76/80 for L=512).
      masked_lm_prob, short_seq_prob, whole_word_mask: as create_pretraining_data.py.
      dupe_factor: None = dynamic masking (new masks every epoch); an int = static masking
        with that many duplicates.

    Metrics are (numerator, denominator) sums:
      masked_lm_loss     (sum w*CE, sum w)        masked_lm_accuracy (sum w*correct, sum w)
      next_sentence_loss (sum CE, rows)           next_sentence_accuracy (sum correct, rows)
      loss               (step loss * f, f) where f = this microbatch's share of the batch
                         rows, so the f's of one step add up to 1 and `summarize` gives the mean
                         total loss per step (or per eval batch).
    `rows` counts real rows (whose [CLS] is not padding): every row while training, so NSP
    matches the reference's batch mean; exhausted eval batches' all-padding rows drop out.
    """

    next_sentence: bool = True
    max_predictions_per_seq: int = 20
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    whole_word_mask: bool = False
    dupe_factor: int | None = None

    name = "bert_pretraining"
    required_special_pieces = ("cls", "sep", "mask", "pad")

    def make_model(self, cfg: TransformerConfig) -> nn.Module:
        if cfg.causal is not False:
            raise ConfigError("BertPretrainingObjective needs a bidirectional encoder: "
                             "TransformerConfig.causal must be False (use a configs/models/"
                             "bert_*.gin model config, or bind TransformerConfig.causal = False).")
        if cfg.type_vocab_size < 2:
            raise ConfigError(f"BertPretrainingObjective needs token-type embeddings for segments "
                             f"A and B: TransformerConfig.type_vocab_size={cfg.type_vocab_size}, "
                             "set it to 2.")
        return BertPretrainer(cfg)

    def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        ints = np.zeros((batch_size, seq_len), np.int32)
        preds = np.zeros((batch_size, self.max_predictions_per_seq), np.int32)
        return {"input_ids": ints, "input_mask": ints, "segment_ids": ints,
                "masked_lm_positions": preds, "masked_lm_ids": preds,
                "masked_lm_weights": preds.astype(np.float32),
                "next_sentence_labels": np.zeros((batch_size,), np.int32)}

    def init(self, model: nn.Module, rngs: dict[str, Array], batch: dict[str, Any]):
        return model.init(rngs, batch["input_ids"], batch["input_mask"], batch["segment_ids"],
                          batch["masked_lm_positions"], deterministic=True)

    def normalizers(self, batch: dict[str, Array]) -> dict[str, Array]:
        """Whole-batch denominators: masked_lm = sum(weights) + 1e-5, rows = real rows (>= 1),
        batch_rows = B (static)."""
        rows = jnp.sum((batch["input_mask"][:, 0] > 0).astype(jnp.float32))
        return {"masked_lm": jnp.sum(batch["masked_lm_weights"].astype(jnp.float32)) + MLM_EPSILON,
                "rows": jnp.maximum(rows, 1.0),
                "batch_rows": jnp.asarray(batch["input_ids"].shape[0], jnp.float32)}

    def loss(self, model: nn.Module, params: Any, batch: dict[str, Array], rng: Array,
             normalizers: dict[str, Array], deterministic: bool) -> tuple[Array, MetricSums]:
        """(this (micro)batch's contribution to the whole-batch loss, metric sums)."""
        mlm_logits, nsp_logits = model.apply(
            {"params": params}, batch["input_ids"], batch["input_mask"], batch["segment_ids"],
            batch["masked_lm_positions"], deterministic=deterministic, rngs={"dropout": rng})
        weights = batch["masked_lm_weights"].astype(jnp.float32)
        mlm_ce = optax.softmax_cross_entropy_with_integer_labels(mlm_logits, batch["masked_lm_ids"])
        mlm_correct = (jnp.argmax(mlm_logits, -1) == batch["masked_lm_ids"]).astype(jnp.float32)
        mlm_sum, weight_sum = jnp.sum(weights * mlm_ce), jnp.sum(weights)
        total = mlm_sum / normalizers["masked_lm"]
        metrics = {"masked_lm_loss": (mlm_sum, weight_sum),
                   "masked_lm_accuracy": (jnp.sum(weights * mlm_correct), weight_sum)}
        if self.next_sentence:
            labels = batch["next_sentence_labels"]
            real = (batch["input_mask"][:, 0] > 0).astype(jnp.float32)
            nsp_ce = optax.softmax_cross_entropy_with_integer_labels(nsp_logits, labels)
            nsp_correct = (jnp.argmax(nsp_logits, -1) == labels).astype(jnp.float32)
            nsp_sum, rows = jnp.sum(real * nsp_ce), jnp.sum(real)
            total = total + nsp_sum / normalizers["rows"]
            metrics["next_sentence_loss"] = (nsp_sum, rows)
            metrics["next_sentence_accuracy"] = (jnp.sum(real * nsp_correct), rows)
        # The contributions of one step's microbatches add up to the step loss and their
        # shares to 1, so (sum of numerators) / (sum of denominators) is the mean step loss.
        share = batch["input_ids"].shape[0] / normalizers["batch_rows"]
        metrics["loss"] = (total, share)
        return total, metrics

    def make_iterator(self, source, tokenizer, **kwargs):
        """`make_bert_pretraining_iterator` with this objective's knobs; kwargs from the trainer
        (seq_len, global_batch_size, seed, process_index, process_count, repeat, shuffle)."""
        return make_bert_pretraining_iterator(
            source, tokenizer, max_predictions_per_seq=self.max_predictions_per_seq,
            masked_lm_prob=self.masked_lm_prob, short_seq_prob=self.short_seq_prob,
            whole_word_mask=self.whole_word_mask, next_sentence=self.next_sentence,
            dupe_factor=self.dupe_factor, **kwargs)

    def training_flops(self, cfg: TransformerConfig, batch_size: int, seq_len: int, *,
                       causal_half: bool | None = None) -> float:
        """Stack + MLM heads at the P gathered positions + pooler (+ NSP) (`flops.training_flops`)."""
        return flops.training_flops(cfg, batch_size, seq_len,
                                    mlm_predictions=self.max_predictions_per_seq,
                                    next_sentence=self.next_sentence, causal_half=causal_half)
