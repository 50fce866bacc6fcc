"""BERT pretraining: masked language modelling (MLM) plus next-sentence prediction (NSP).

Follows google-research/bert `run_pretraining.py`:

* encoder: the shared `TransformerStack` made bidirectional (`causal=False`), post-LN, exact
  erf GELU, learned positions, token-type embeddings and an embedding LayerNorm (see
  `configs/models/bert_*.gin`);
* pooler: dense D -> D + tanh on the first ([CLS]) token;
* MLM head: dense D -> D, exact GELU, LayerNorm, then the output projection tied to the input
  token embedding plus a learned output bias [V], evaluated only at the gathered
  `masked_lm_positions` (never full-sequence logits);
* NSP head: dense pooled -> 2 (label 0 = actual next segment, 1 = random);
* loss = masked_lm_loss + next_sentence_loss with
  masked_lm_loss = sum(w * CE) / (sum(w) + 1e-5) over predicted positions and
  next_sentence_loss = mean CE over the batch.

Shapes: B batch, L sequence length, P max predictions per sequence, D d_model, V vocab.
New logical parameter axes: `classes` (NSP outputs). The D -> D head matrices are
('mlp', 'embed'): two distinct names (one parameter must not name a mesh axis twice), and the
output dimension on `embed`, as the token embedding that the MLM projection contracts with.
The opposite choice, ('embed', 'mlp'), gave wrong gradients (up to ~60% off; forward exact)
on a data=2 x fsdp=2 x tensor=2 CPU mesh with jax/jaxlib 0.10.2, Shardy or GSPMD alike: a
[B, P, D] batch-sharded input through a P(fsdp, tensor) kernel, then contracted with a
P(tensor, fsdp) [V, D] embedding. tests/test_bert_model.py guards the chosen layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.losses import MetricSums
from research.model import Norm, TransformerConfig, TransformerStack, gelu_exact

Array = jax.Array

NUM_NSP_CLASSES = 2
MLM_EPSILON = 1e-5  # run_pretraining.py: denominator = sum(label_weights) + 1e-5


def _normal(cfg: TransformerConfig, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)


def _zeros(axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
    return nn.with_logical_constraint(x, axes)


def gather_positions(sequence: Array, positions: Array) -> Array:
    """Rows of `sequence` [B, L, D] at `positions` int[B, P] -> [B, P, D]."""
    return jnp.take_along_axis(sequence, positions[..., None].astype(jnp.int32), axis=1)


class BertPretrainer(nn.Module):
    """Bidirectional encoder with BERT's pooler, MLM head and NSP head.

    Parameters (logical axes):
      encoder/...                 the TransformerStack (see research.model)
      pooler/{kernel, bias}       [D, D] ('mlp', 'embed'), [D] ('embed',)
      mlm_transform/{kernel,bias} [D, D] ('mlp', 'embed'), [D] ('embed',)
      mlm_norm/...                LayerNorm [D] ('embed',)
      mlm_output_bias             [V] ('vocab',)
      mlm_output/kernel           [D, V] ('embed', 'vocab'), only if tie_embeddings is False
      nsp/{kernel, bias}          [D, 2] ('embed', 'classes'), [2] ('classes',)
    """

    cfg: TransformerConfig

    def setup(self):
        cfg = self.cfg
        if cfg.causal:
            raise ValueError("BertPretrainer needs a bidirectional encoder: set "
                             "TransformerConfig.causal = False (configs/models/bert_*.gin do).")
        dense = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        self.encoder = TransformerStack(cfg, name="encoder")
        self.pooler = nn.Dense(cfg.d_model, kernel_init=_normal(cfg, ("mlp", "embed")),
                               bias_init=_zeros(("embed",)), name="pooler", **dense)
        self.mlm_transform = nn.Dense(cfg.d_model, kernel_init=_normal(cfg, ("mlp", "embed")),
                                      bias_init=_zeros(("embed",)), name="mlm_transform", **dense)
        self.mlm_norm = Norm(cfg, name="mlm_norm")
        self.mlm_output_bias = self.param("mlm_output_bias", _zeros(("vocab",)),
                                          (cfg.vocab_size,), cfg.params_dtype)
        if not cfg.tie_embeddings:
            self.mlm_output = nn.Dense(cfg.vocab_size, use_bias=False,
                                       kernel_init=_normal(cfg, ("embed", "vocab")),
                                       name="mlm_output", **dense)
        self.nsp = nn.Dense(NUM_NSP_CLASSES, kernel_init=_normal(cfg, ("embed", "classes")),
                            bias_init=_zeros(("classes",)), name="nsp", **dense)

    def encode(self, input_ids: Array, input_mask: Array, token_type_ids: Array, *,
               deterministic: bool = True) -> tuple[Array, Array]:
        """Encoder outputs for fine-tuning.

        input_ids, input_mask (1 real / 0 padding), token_type_ids: int[B, L].
        Returns (sequence [B, L, D] (act_batch, act_length, act_embed),
                 pooled [B, D] (act_batch, act_embed): tanh(dense(sequence[:, 0]))).
        Padding is attention segment 0, so real tokens never attend to padding.
        """
        sequence = self.encoder(input_ids, segment_ids=input_mask.astype(jnp.int32),
                                token_type_ids=token_type_ids, deterministic=deterministic)
        pooled = jnp.tanh(self.pooler(sequence[:, 0]))
        return sequence, _constrain(pooled, ("act_batch", "act_embed"))

    def mlm_logits(self, sequence: Array, masked_lm_positions: Array) -> Array:
        """float32 logits [B, P, V] (act_batch, None, act_vocab) at the predicted positions only."""
        cfg = self.cfg
        x = gather_positions(sequence, masked_lm_positions)  # [B, P, D]
        x = _constrain(x, ("act_batch", None, "act_embed"))
        x = self.mlm_norm(gelu_exact(self.mlm_transform(x)))
        if cfg.tie_embeddings:
            logits = self.encoder.token_embed.attend(x)
        else:
            logits = self.mlm_output(x)
        logits = logits.astype(jnp.float32) + self.mlm_output_bias.astype(jnp.float32)
        return _constrain(logits, ("act_batch", None, "act_vocab"))

    def nsp_logits(self, pooled: Array) -> Array:
        """float32 logits [B, 2] from the pooled [CLS] vector [B, D]."""
        return self.nsp(pooled).astype(jnp.float32)

    def __call__(self, input_ids: Array, input_mask: Array, token_type_ids: Array,
                 masked_lm_positions: Array, deterministic: bool = True) -> tuple[Array, Array]:
        """Pretraining logits.

        input_ids, input_mask, token_type_ids: int[B, L]; masked_lm_positions: int[B, P].
        Returns (mlm_logits float32[B, P, V], nsp_logits float32[B, 2]).
        """
        sequence, pooled = self.encode(input_ids, input_mask, token_type_ids,
                                       deterministic=deterministic)
        return self.mlm_logits(sequence, masked_lm_positions), self.nsp_logits(pooled)


def bert_param_count(cfg: TransformerConfig, *, heads: bool = False) -> int:
    """Analytic parameter count: encoder + pooler (the paper's "110M" convention for BERT-base,
    = Hugging Face `BertModel`), plus the MLM and NSP heads when `heads` (= `BertForPreTraining`)."""
    from research.model import analytic_param_count
    d, v = cfg.d_model, cfg.vocab_size
    total = analytic_param_count(cfg) + d * d + d  # encoder + pooler
    if heads:
        norm = 2 * d if cfg.norm == "layernorm" else d
        total += d * d + d + norm + v  # MLM transform, LayerNorm, output bias
        total += d * NUM_NSP_CLASSES + NUM_NSP_CLASSES
    return total


@gin.configurable
@dataclasses.dataclass(frozen=True)
class BertPretrainingObjective:
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
            raise ValueError("BertPretrainingObjective needs a bidirectional encoder: "
                             "TransformerConfig.causal must be False (use a configs/models/"
                             "bert_*.gin model config, or bind TransformerConfig.causal = False).")
        if cfg.type_vocab_size < 2:
            raise ValueError(f"BertPretrainingObjective needs token-type embeddings for segments "
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
        from research.data.bert_pretraining import make_bert_pretraining_iterator
        return make_bert_pretraining_iterator(
            source, tokenizer, max_predictions_per_seq=self.max_predictions_per_seq,
            masked_lm_prob=self.masked_lm_prob, short_seq_prob=self.short_seq_prob,
            whole_word_mask=self.whole_word_mask, next_sentence=self.next_sentence,
            dupe_factor=self.dupe_factor, **kwargs)
