"""The building blocks every model here shares: initializers and activation constraints with
logical axis names, the dense `Projection`, `Dropout`, `Norm`, `gelu_exact` and the `Mlp`.

Every parameter carries logical axis names (`research.training.partitioning` maps them onto the
mesh) and large activations are constrained with logical names too; `normal_init`,
`zeros_init` and `constrain` are the one place those names are attached.

Shapes: B batch, T length, D d_model, F mlp width.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from research.models.projection_dot import dense_dot_general, projection_dot
from research.models.transformer_config import TransformerConfig

Array = jax.Array
LogicalAxes = tuple[str | None, ...]
Initializer = Callable[..., Array]


def normal_init(std: float, axes: LogicalAxes) -> Initializer:
    """N(0, std^2) initializer whose parameter carries the logical `axes` (one per dim)."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def zeros_init(axes: LogicalAxes) -> Initializer:
    """Zeros initializer whose parameter carries the logical `axes` (one per dim)."""
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def constrain(x: Array, axes: LogicalAxes) -> Array:
    """`x` with its sharding constrained to the logical `axes` (one per dim)."""
    return nn.with_logical_constraint(x, axes)


class Projection(nn.Module):
    """x[..., *in] @ kernel[*in, *features] (+ bias[*features]), kernel created at its true rank.

    `axes` names the kernel dims (the `in_dims` input dims, then the feature dims); the bias
    takes the feature names. Example: the query projection [B, T, D] -> [B, T, N, H] has
    features (N, H) and axes ('embed', 'heads', 'head_dim'). Computes in `cfg.dtype`.
    """

    features: tuple[int, ...]
    axes: tuple[str, ...]
    cfg: TransformerConfig
    in_dims: int = 1
    bias: bool | None = None  # None: cfg.use_bias

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        in_shape = x.shape[x.ndim - self.in_dims:]
        kernel = self.param("kernel", normal_init(cfg.init_std, self.axes),
                            in_shape + tuple(self.features), cfg.params_dtype)
        out = projection_dot(x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype),
                             self.in_dims)
        if cfg.use_bias if self.bias is None else self.bias:
            bias = self.param("bias", zeros_init(self.axes[self.in_dims:]), tuple(self.features),
                              cfg.params_dtype)
            out = out + bias.astype(cfg.compute_dtype)
        return out


class Dropout(nn.Module):
    """Inverted dropout; on the CPU drawing 16-bit uniforms, two from each 32-bit threefry word.

    Same contract as `nn.Dropout` (rng collection 'dropout', identity when deterministic).
    `bits`: 16 halves the random bits, which dominate dropout on CPU (2.5x faster on a
    [8, 12, 256, 256] attention-probability tensor); 32 draws one word per element; None (the
    default) takes 16 on CPU and 32 elsewhere (`TransformerConfig.dropout_bits`). The keep
    probability is rounded to a multiple of 2^-bits (0.9 -> 58982/65536 = 0.899994 at 16) and
    kept values are scaled by the inverse of that rounded probability, so the output's
    expectation equals the input exactly. Random bits come from `jax.random.bits`, so they do
    not depend on sharding. Any shape.
    """

    rate: float
    bits: int | None = None

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        bits = self.bits or (16 if jax.default_backend() == "cpu" else 32)
        keep = round((1.0 - self.rate) * 2 ** bits)  # kept when a uniform < keep
        if keep <= 0:
            return jnp.zeros_like(x)
        if keep >= 2 ** bits:  # the keep probability rounds to 1
            return x
        shape = x.shape or (1,)
        rng = self.make_rng("dropout")
        if bits == 32:
            uniform = jax.random.bits(rng, shape, jnp.uint32).reshape(x.shape)
        else:
            last = shape[-1]
            words = jax.random.bits(rng, shape[:-1] + ((last + 1) // 2,), jnp.uint32)
            uniform = jnp.stack([words & 0xFFFF, words >> 16], axis=-1)
            uniform = uniform.reshape(shape[:-1] + (2 * words.shape[-1],))[..., :last]
            uniform = uniform.reshape(x.shape)
        wide = jnp.promote_types(x.dtype, jnp.float32)  # rescale bf16 in fp32, round once
        kept = (x.astype(wide) * jnp.asarray(2 ** bits / keep, wide)).astype(x.dtype)
        return jnp.where(uniform < jnp.uint32(keep), kept, jnp.zeros((), x.dtype))


class Norm(nn.Module):
    """LayerNorm or RMSNorm (`cfg.norm`) over the last axis [..., D], statistics in float32.

    Parameters: scale [D] ('embed',), and for LayerNorm bias [D] ('embed',). With
    `cfg.norm_scale_offset` the RMSNorm multiplies by (offset + scale) (`OffsetRMSNorm`, the
    same parameter path).
    """

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        scale_init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
        if cfg.norm == "rmsnorm" and cfg.norm_scale_offset:
            return OffsetRMSNorm(cfg.norm_eps, cfg.norm_scale_offset, cfg.compute_dtype,
                                 cfg.params_dtype, name="RMSNorm_0")(x)
        if cfg.norm == "rmsnorm":
            return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.compute_dtype,
                              param_dtype=cfg.params_dtype, scale_init=scale_init)(x)
        return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=cfg.compute_dtype,
                            param_dtype=cfg.params_dtype, scale_init=scale_init,
                            bias_init=zeros_init(("embed",)), use_bias=True)(x)


class OffsetRMSNorm(nn.Module):
    """RMSNorm over the last axis [..., D] that multiplies by (offset + scale), in float32:
    x / sqrt(mean(x^2) + eps) * (offset + scale), cast to `dtype`. Gemma's norm is offset 1
    (`(1 + weight)`, weight initialised to 0). Parameter: scale [D] ('embed',), initialised to
    1 - offset (the identity)."""

    epsilon: float
    offset: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.with_logical_partitioning(nn.initializers.constant(1.0 - self.offset),
                                            ("embed",))
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return (y * (self.offset + scale.astype(jnp.float32))).astype(self.dtype)


def gelu_exact(x: Array) -> Array:
    """x * Phi(x) as 0.5 x (1 + erf(x / sqrt 2)), the form BERT and PyTorch use. Same values as
    `jax.nn.gelu(approximate=False)` (which goes through erfc) to ~1e-6, and 2.5x cheaper on CPU."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


class Mlp(nn.Module):
    """Feed-forward block [B, T, D] -> [B, T, D]: gelu/relu (one input matrix) or swiglu/geglu
    (gated, two).

    Parameters: wi/kernel (and wg/kernel when gated) [D, F] ('embed', 'mlp'), bias [F] ('mlp',);
    wo/kernel [F, D] ('mlp', 'embed'), bias [D] ('embed',). The hidden activation [B, T, F] is
    constrained to (act_batch, act_length, act_mlp). No dropout inside (BERT and GPT-2 drop
    only the block's output, in `research.models.transformer.Block`).
    """

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        dense = functools.partial(nn.Dense, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                                  use_bias=cfg.use_bias, dot_general=dense_dot_general)
        up = functools.partial(dense, cfg.mlp_dim,
                               kernel_init=normal_init(cfg.init_std, ("embed", "mlp")),
                               bias_init=zeros_init(("mlp",)))
        h = up(name="wi")(x)
        if cfg.activation in ("swiglu", "geglu"):
            gate = up(name="wg")(x)
            act = nn.silu if cfg.activation == "swiglu" else functools.partial(nn.gelu, approximate=True)
            h = act(gate) * h
        elif cfg.activation == "relu":
            h = nn.relu(h)
        elif cfg.activation == "gelu":
            h = nn.gelu(h, approximate=True)
        else:
            h = gelu_exact(h)
        h = checkpoint_name(h, "matmul_out")
        h = constrain(h, ("act_batch", "act_length", "act_mlp"))
        out = dense(cfg.d_model, kernel_init=normal_init(cfg.init_std, ("mlp", "embed")),
                    bias_init=zeros_init(("embed",)), name="wo")(h)
        return checkpoint_name(out, "matmul_out")
