"""The causal language-model objective (GPT pretraining): next-token prediction over packed
documents with `research.models.transformer.CausalLM`. The interface is `objectives/base.py`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from research.data.causal_lm import make_causal_lm_iterator
from research.errors import ConfigError
from research.models import flops
from research.models.transformer import CausalLM, TransformerConfig
from research.objectives import losses
from research.objectives.base import Batch, Objective


@gin.configurable
class CausalLMObjective(Objective):
    """Autoregressive next-token prediction over packed documents (GPT pretraining).

    `loss_chunk_size` (gin: `CausalLMObjective.loss_chunk_size = 128`): None computes the
    full float32 [B, T, V] logits; an int computes the output projection and cross entropy
    in sequence chunks of that length (`losses.chunked_cross_entropy`), so only
    [B, chunk, V] logits are ever alive: same loss and gradients, less memory at large vocab.
    """

    name = "causal_lm"
    required_special_pieces = ("bos", "eos", "pad")
    eval_perplexity = True
    reads_token_ids = True

    def __init__(self, loss_chunk_size: int | None = None):
        self.loss_chunk_size = loss_chunk_size

    def make_model(self, cfg: TransformerConfig) -> nn.Module:
        if not cfg.causal:
            raise ConfigError("CausalLMObjective needs a causal decoder: TransformerConfig.causal = "
                              "True (use a configs/models/gpt_*.gin model config).")
        return CausalLM(cfg)

    def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        ints = np.zeros((batch_size, seq_len), np.int32)
        return {"inputs": ints, "targets": ints, "segment_ids": ints, "positions": ints,
                "weights": np.zeros((batch_size, seq_len), np.float32)}

    def init(self, model: nn.Module, rngs: dict[str, jax.Array], batch: Batch):
        return model.init(rngs, batch["inputs"], segment_ids=batch["segment_ids"],
                          positions=batch["positions"])

    def normalizers(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return {"tokens": jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)}

    def loss(self, model: nn.Module, params: Any, batch: dict[str, jax.Array], rng: jax.Array,
             normalizers: dict[str, jax.Array], deterministic: bool):
        if self.loss_chunk_size:
            hidden = model.apply({"params": params}, batch["inputs"],
                                 segment_ids=batch["segment_ids"], positions=batch["positions"],
                                 deterministic=deterministic, rngs={"dropout": rng},
                                 method=CausalLM.hidden)

            def project(h):
                return model.apply({"params": params}, h, method=CausalLM.project)

            loss_sum, correct, count = losses.chunked_cross_entropy(
                hidden, project, batch["targets"], batch["weights"], self.loss_chunk_size)
        else:
            logits = model.apply({"params": params}, batch["inputs"],
                                 segment_ids=batch["segment_ids"], positions=batch["positions"],
                                 deterministic=deterministic, rngs={"dropout": rng})
            loss_sum, correct, count = losses.weighted_cross_entropy(
                logits, batch["targets"], batch["weights"])
        metrics = {"loss": (loss_sum, count), "accuracy": (correct, count)}
        return loss_sum / normalizers["tokens"], metrics

    def make_iterator(self, source, tokenizer, **kwargs):
        """`make_causal_lm_iterator`: packed [B, T] inputs/targets/segment_ids/positions/weights."""
        return make_causal_lm_iterator(source, tokenizer, **kwargs)

    def training_flops(self, cfg: TransformerConfig, batch_size: int, seq_len: int, *,
                       causal_half: bool | None = None) -> float:
        """Stack + output projection at every position (`flops.training_flops`)."""
        return flops.training_flops(cfg, batch_size, seq_len, causal_half=causal_half)
