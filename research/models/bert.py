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

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.errors import ConfigError
from research.models.layers import Norm, constrain, gelu_exact, normal_init, zeros_init
from research.models.transformer import TransformerConfig, TransformerStack, analytic_param_count

Array = jax.Array

NUM_NSP_CLASSES = 2


def gather_positions(sequence: Array, positions: Array) -> Array:
    """Rows of `sequence` [B, L, D] at `positions` int[B, P] -> [B, P, D]."""
    return jnp.take_along_axis(sequence, positions[..., None].astype(jnp.int32), axis=1)


class BertPretrainer(nn.Module):
    """Bidirectional encoder with BERT's pooler, MLM head and NSP head.

    Parameters (logical axes):
      encoder/...                 the TransformerStack (see research.models.transformer)
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
            raise ConfigError("BertPretrainer needs a bidirectional encoder: set "
                              "TransformerConfig.causal = False (configs/models/bert_*.gin do).")
        dense = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        # input_mask (the encoder's segment ids) is 1 for the real tokens, then 0: right padding
        self.encoder = TransformerStack(dataclasses.replace(cfg, padding_segments=True),
                                        name="encoder")
        self.pooler = nn.Dense(cfg.d_model, kernel_init=normal_init(cfg.init_std, ("mlp", "embed")),
                               bias_init=zeros_init(("embed",)), name="pooler", **dense)
        self.mlm_transform = nn.Dense(cfg.d_model,
                                      kernel_init=normal_init(cfg.init_std, ("mlp", "embed")),
                                      bias_init=zeros_init(("embed",)), name="mlm_transform",
                                      **dense)
        self.mlm_norm = Norm(cfg, name="mlm_norm")
        self.mlm_output_bias = self.param("mlm_output_bias", zeros_init(("vocab",)),
                                          (cfg.vocab_size,), cfg.params_dtype)
        if not cfg.tie_embeddings:
            self.mlm_output = nn.Dense(cfg.vocab_size, use_bias=False,
                                       kernel_init=normal_init(cfg.init_std, ("embed", "vocab")),
                                       name="mlm_output", **dense)
        self.nsp = nn.Dense(NUM_NSP_CLASSES,
                            kernel_init=normal_init(cfg.init_std, ("embed", "classes")),
                            bias_init=zeros_init(("classes",)), name="nsp", **dense)

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
        return sequence, constrain(pooled, ("act_batch", "act_embed"))

    def mlm_logits(self, sequence: Array, masked_lm_positions: Array) -> Array:
        """float32 logits [B, P, V] (act_batch, None, act_vocab) at the predicted positions only."""
        cfg = self.cfg
        x = gather_positions(sequence, masked_lm_positions)  # [B, P, D]
        x = constrain(x, ("act_batch", None, "act_embed"))
        x = self.mlm_norm(gelu_exact(self.mlm_transform(x)))
        if cfg.tie_embeddings:
            logits = self.encoder.token_embed.attend(x)
        else:
            logits = self.mlm_output(x)
        logits = logits.astype(jnp.float32) + self.mlm_output_bias.astype(jnp.float32)
        return constrain(logits, ("act_batch", None, "act_vocab"))

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
    d, v = cfg.d_model, cfg.vocab_size
    total = analytic_param_count(cfg) + d * d + d  # encoder + pooler
    if heads:
        norm = 2 * d if cfg.norm == "layernorm" else d
        total += d * d + d + norm + v  # MLM transform, LayerNorm, output bias
        total += d * NUM_NSP_CLASSES + NUM_NSP_CLASSES
    return total
