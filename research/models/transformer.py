"""One transformer stack for decoders (GPT) and encoders (BERT): `Block`, `TransformerStack`,
`CausalLM` and the parameter counts.

Pure flax.linen: `init`/`apply`, no hidden state. Every parameter carries logical axis names
(`research.training.partitioning` maps them onto the mesh) and every large activation is constrained
with logical names too. The GPT decoder and the BERT encoder are the same `TransformerStack`;
only `TransformerConfig.causal` (the attention mask) and the embedding extras differ.

Where the parts live: `TransformerConfig` in `research.models.transformer_config` (re-exported
here), the shared layers (`Projection`, `Dropout`, `Norm`, `Mlp`, initializers) in
`research.models.layers`, self-attention in `research.models.attention`.

Logical axes
  parameters:  vocab, embed, mlp, heads, kv_heads, head_dim, layers (scan), type_vocab, position
  activations: act_batch, act_length, act_embed, act_mlp, act_heads, act_kv_heads, act_vocab

Shapes: B batch, T query length, S key length, D d_model, N heads, K kv heads, H head_dim,
F mlp width, V vocab.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.errors import ConfigError
from research.models.attention import Attention
from research.models.layers import Dropout, Mlp, Norm, constrain, normal_init
from research.models.transformer_config import REMAT_POLICIES, TransformerConfig

__all__ = ["Block", "CausalLM", "TransformerConfig", "TransformerStack", "analytic_param_count",
           "count_params", "remat_policy"]

Array = jax.Array


class Block(nn.Module):
    """Attention + MLP with residuals, norm before (pre-LN) or after (post-LN) each.

    Parameters: attention/..., mlp/..., attention_norm/..., mlp_norm/... (see
    `research.models.attention.Attention`, `research.models.layers.Mlp` and `Norm`).
    """

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, positions: Array,
                 deterministic: bool, decode: bool = False) -> Array:
        """x [B, T, D]; segment_ids, positions int[B, T]. Returns [B, T, D]
        (act_batch, act_length, act_embed)."""
        cfg = self.cfg
        drop = functools.partial(Dropout(cfg.dropout_rate, cfg.dropout_bits),
                                 deterministic=deterministic)
        attn = Attention(cfg, name="attention")
        mlp = Mlp(cfg, name="mlp")
        if cfg.norm_placement == "pre":
            h = attn(Norm(cfg, name="attention_norm")(x), segment_ids, positions,
                     deterministic=deterministic, decode=decode)
            x = x + drop(h)
            x = x + drop(mlp(Norm(cfg, name="mlp_norm")(x)))
        else:
            h = attn(x, segment_ids, positions, deterministic=deterministic, decode=decode)
            x = Norm(cfg, name="attention_norm")(x + drop(h))
            x = Norm(cfg, name="mlp_norm")(x + drop(mlp(x)))
        return constrain(x, ("act_batch", "act_length", "act_embed"))


def remat_policy(name: str) -> Callable[..., bool] | None:
    """The `jax.checkpoint` policy for a named remat setting (None = save nothing)."""
    policies = jax.checkpoint_policies
    if name == "full":
        return policies.nothing_saveable
    if name == "save_matmuls":
        return policies.save_only_these_names("matmul_out", "attention_out")
    if name == "save_attention":
        return policies.save_only_these_names("attention_out")
    if name == "offload":
        return policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=["matmul_out", "attention_out"],
            offload_src="device", offload_dst="pinned_host")
    raise ConfigError(f"unknown remat policy {name!r}; choose one of {REMAT_POLICIES}")


class _ScanBlock(nn.Module):
    """A Block with the (carry, _) -> (carry, None) signature nn.scan needs; scanned, its
    parameters gain a leading [num_layers] dim on the logical axis 'layers'."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, positions: Array, deterministic: bool,
                 decode: bool) -> tuple[Array, None]:
        return Block(self.cfg, name="block")(x, segment_ids, positions, deterministic, decode), None


def _lookup(embed: nn.Embed, ids: Array, rows_axis: str) -> Array:
    """embed(ids) with the table's embedding dim gathered first: [V, D] (vocab sharded, embed
    replicated) -> rows [B, T, D] sharded like `ids` (batch). Gathering straight from an
    embed-sharded table gives D-sharded rows that GSPMD cannot move to batch sharding except by
    replicating them ("involuntary full rematerialization" on data x fsdp x tensor meshes);
    this is the FSDP all-gather of one weight, as every matmul weight gets."""
    table = constrain(embed.embedding, (rows_axis, None))
    return jnp.take(table, ids, axis=0).astype(embed.dtype or table.dtype)


class TransformerStack(nn.Module):
    """Embeddings → num_layers Blocks → final norm. Causal or bidirectional by config.

    Returns hidden states [B, T, D] (act_batch, act_length, act_embed).

    Parameters: token_embed/embedding [V, D] ('vocab', 'embed'); position_embed/embedding
    [max_len, D] ('position', 'embed') with learned positions; type_embed/embedding
    [type_vocab_size, D] ('type_vocab', 'embed') when type_vocab_size > 0; embedding_norm/...;
    layer_0/... .. layer_{L-1}/... (`Block`), or layers/block/... stacked on 'layers' with
    scan_layers; final_norm/... with pre-LN.
    """

    cfg: TransformerConfig

    def setup(self):
        cfg = self.cfg
        self.token_embed = nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
            embedding_init=normal_init(cfg.init_std, ("vocab", "embed")), name="token_embed")
        if cfg.position == "learned":
            self.position_embed = nn.Embed(
                cfg.max_len, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                embedding_init=normal_init(cfg.init_std, ("position", "embed")),
                name="position_embed")
        if cfg.type_vocab_size:
            self.type_embed = nn.Embed(
                cfg.type_vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                param_dtype=cfg.params_dtype,
                embedding_init=normal_init(cfg.init_std, ("type_vocab", "embed")), name="type_embed")
        if cfg.embedding_norm:
            self.embedding_norm = Norm(cfg, name="embedding_norm")
        self.dropout = Dropout(cfg.dropout_rate, cfg.dropout_bits)

        block = _ScanBlock if cfg.scan_layers else Block
        if cfg.remat_policy != "none":
            # static_argnums count `self` as 0: (self, x, segment_ids, positions, deterministic, decode).
            block = nn.remat(block, policy=remat_policy(cfg.remat_policy),
                             prevent_cse=not cfg.scan_layers, static_argnums=(4, 5))
        if cfg.scan_layers:
            self.layers = nn.scan(
                block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
        else:
            self.layers = [block(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]
        if cfg.norm_placement == "pre":
            self.final_norm = Norm(cfg, name="final_norm")

    def __call__(self, tokens: Array, *, segment_ids: Array | None = None,
                 positions: Array | None = None, token_type_ids: Array | None = None,
                 deterministic: bool = True, decode: bool = False) -> Array:
        """tokens, segment_ids, positions, token_type_ids: int[B, T]. Returns [B, T, D]."""
        cfg = self.cfg
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = _lookup(self.token_embed, tokens, "vocab")
        if cfg.scale_embeddings:  # Gemma: sqrt(d_model), rounded to the embedding dtype
            x = x * jnp.asarray(cfg.d_model ** 0.5, x.dtype)
        if cfg.position == "learned":
            x = x + _lookup(self.position_embed, positions, "position")
        if cfg.type_vocab_size:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(tokens)
            x = x + _lookup(self.type_embed, token_type_ids, "type_vocab")
        if cfg.embedding_norm:
            x = self.embedding_norm(x)
        x = self.dropout(x, deterministic=deterministic)
        x = constrain(x.astype(cfg.compute_dtype), ("act_batch", "act_length", "act_embed"))
        if cfg.scan_layers:
            x, _ = self.layers(x, segment_ids, positions, deterministic, decode)
        else:
            for layer in self.layers:
                x = layer(x, segment_ids, positions, deterministic, decode)
        if cfg.norm_placement == "pre":
            x = self.final_norm(x)
        return x


class CausalLM(nn.Module):
    """Decoder-only language model (GPT). `__call__` returns float32 logits [B, T, V]
    (act_batch, act_length, act_vocab).

    Parameters: decoder/... (`TransformerStack`); lm_head/kernel [D, V] ('embed', 'vocab')
    only when tie_embeddings is False (otherwise the token embedding is the output projection).
    """

    cfg: TransformerConfig

    def setup(self):
        cfg = self.cfg
        self.decoder = TransformerStack(cfg, name="decoder")
        if not cfg.tie_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                                    param_dtype=cfg.params_dtype,
                                    kernel_init=normal_init(cfg.init_std, ("embed", "vocab")),
                                    name="lm_head")

    def __call__(self, tokens: Array, *, segment_ids: Array | None = None,
                 positions: Array | None = None, deterministic: bool = True,
                 decode: bool = False) -> Array:
        """tokens, segment_ids, positions: int[B, T]. Returns float32 logits [B, T, V]."""
        x = self.hidden(tokens, segment_ids=segment_ids, positions=positions,
                        deterministic=deterministic, decode=decode)
        return self.project(x)

    def hidden(self, tokens: Array, *, segment_ids: Array | None = None,
               positions: Array | None = None, deterministic: bool = True,
               decode: bool = False) -> Array:
        """Final hidden states [B, T, D] (before the output projection)."""
        return self.decoder(tokens, segment_ids=segment_ids, positions=positions,
                            deterministic=deterministic, decode=decode)

    def project(self, x: Array) -> Array:
        """Hidden states [B, T, D] -> float32 logits [B, T, V]."""
        if self.cfg.tie_embeddings:
            out = self.decoder.token_embed.attend(x)
        else:
            out = self.lm_head(x)
        return constrain(out.astype(jnp.float32), ("act_batch", "act_length", "act_vocab"))


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))


def analytic_param_count(cfg: TransformerConfig) -> int:
    """Parameter count from the config alone (decoder stack; no task heads)."""
    d, f, n, k, h, v = (cfg.d_model, cfg.mlp_dim, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head,
                        cfg.vocab_size)
    bias = cfg.use_bias
    norm = 2 * d if cfg.norm == "layernorm" else d
    qkv_bias = bias or cfg.qkv_bias
    attn = d * n * h + 2 * d * k * h + n * h * d + (qkv_bias and n * h + 2 * k * h) + (bias and d)
    mats = 3 if cfg.activation in ("swiglu", "geglu") else 2
    mlp = mats * d * f + (bias and ((mats - 1) * f + d))
    layer = attn + mlp + 2 * norm
    total = cfg.num_layers * layer + v * d
    if cfg.position == "learned":
        total += cfg.max_len * d
    if cfg.type_vocab_size:
        total += cfg.type_vocab_size * d
    if cfg.embedding_norm:
        total += norm
    if cfg.norm_placement == "pre":
        total += norm
    if not cfg.tie_embeddings:
        total += d * v
    return int(total)
