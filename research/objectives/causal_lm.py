"""Training objectives: what model a run trains, what data it reads, and its loss.

An objective bundles the three so that the trainer stays generic. Each exposes:

  make_model(cfg)                      -> flax Module
  dummy_batch(batch, seq_len)          -> dict of zero numpy arrays with the batch's shapes/dtypes
  init(model, rngs, batch)             -> variables
  normalizers(batch)                   -> loss denominators over the *whole* (global) batch
  loss(model, params, batch, rng, normalizers, deterministic)
                                       -> (loss contribution, MetricSums)
  make_iterator(source, tokenizer, ...) -> a resumable batch iterator
  required_special_pieces              -> tokenizer pieces the objective needs

Loss contributions are sums divided by the whole-batch normalizers, so gradients accumulated
over microbatches equal the full-batch gradient exactly.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from research.objectives import losses
from research.models.transformer import CausalLM, TransformerConfig


@gin.configurable
class CausalLMObjective:
    """Autoregressive next-token prediction over packed documents (GPT pretraining).

    `loss_chunk_size` (gin: `CausalLMObjective.loss_chunk_size = 128`): None computes the
    full float32 [B, T, V] logits; an int computes the output projection and cross entropy
    in sequence chunks of that length (`losses.chunked_cross_entropy`), so only
    [B, chunk, V] logits are ever alive: same loss and gradients, less memory at large vocab.
    """

    name = "causal_lm"
    required_special_pieces = ("bos", "eos", "pad")

    def __init__(self, loss_chunk_size: int | None = None):
        self.loss_chunk_size = loss_chunk_size

    def make_model(self, cfg: TransformerConfig) -> nn.Module:
        if not cfg.causal:
            raise ValueError("CausalLMObjective needs TransformerConfig.causal = True.")
        return CausalLM(cfg)

    def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        ints = np.zeros((batch_size, seq_len), np.int32)
        return {"inputs": ints, "targets": ints, "segment_ids": ints, "positions": ints,
                "weights": np.zeros((batch_size, seq_len), np.float32)}

    def init(self, model: nn.Module, rngs: dict[str, jax.Array], batch: dict[str, Any]):
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
        from research.data.causal_lm import make_causal_lm_iterator
        return make_causal_lm_iterator(source, tokenizer, **kwargs)
