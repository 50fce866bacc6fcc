"""The dense layers' product x[..., *in] @ kernel[*in, *out], with a backward that suits XLA:CPU.

`projection_dot(x, kernel, in_dims)` is `lax.dot_general` contracting the last `in_dims` dims of
`x` [*lead, *in] with the first `in_dims` of `kernel` [*in, *out]: [*lead, *out]. Its forward,
values and gradients are the plain product's. Only on the CPU backend (`transposed_weight_grads`)
does its backward differ in form:

The weight gradient dW[*in, *out] = sum over *lead of x[*lead, *in] dy[*lead, *out] contracts
the leading (token) dims of both operands. XLA:CPU's matmul kernels want the contracted dims
last on the left operand and first on the right one, so XLA copies an operand into that layout;
it chose the larger one (e.g. the MLP's [B*T, F] gradient, 4x the size of its [B*T, D] input)
and ran the product as a plain Eigen `dot` rather than a YNNPACK fusion. Here the smaller of x
and dy is transposed explicitly, behind an `optimization_barrier` so that XLA does not fold the
transpose back into the product, and the product is in canonical form. A gpt_small MLP
(B8 x T256, D 768, F 3072) forward + backward ran 8% faster this way on the 2-core CPU
(in-process A/B, medians of 40); see README, Performance.

GPU and TPU compilers pick operand layouts well on their own, so there it is the plain product.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
from jax import lax

Array = jax.Array


def transposed_weight_grads(backend: str | None = None) -> bool:
    """Whether `projection_dot` uses the explicit-transpose backward: on the CPU backend only."""
    return (backend or jax.default_backend()) == "cpu"


def _forward(x: Array, kernel: Array, in_dims: int) -> Array:
    """x [*lead, *in] @ kernel [*in, *out] -> [*lead, *out]."""
    lead = x.ndim - in_dims
    return lax.dot_general(x, kernel, ((tuple(range(lead, x.ndim)), tuple(range(in_dims))),
                                       ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dot_cpu_backward(x: Array, kernel: Array, in_dims: int) -> Array:
    return _forward(x, kernel, in_dims)


def _dot_fwd(x: Array, kernel: Array, in_dims: int) -> tuple[Array, tuple[Array, Array]]:
    return _forward(x, kernel, in_dims), (x, kernel)


def _dot_bwd(in_dims: int, residuals: tuple[Array, Array], dy: Array) -> tuple[Array, Array]:
    x, kernel = residuals
    lead = x.ndim - in_dims             # token dims of x and dy
    out_dims = kernel.ndim - in_dims
    lead_axes = tuple(range(lead))
    # dx [*lead, *in] = dy [*lead, *out] . kernel [*in, *out] over *out (XLA:CPU's kernels take
    # this transposed right operand as it is).
    dx = lax.dot_general(dy, kernel, ((tuple(range(lead, dy.ndim)),
                                       tuple(range(in_dims, kernel.ndim))), ((), ())))
    in_size = math.prod(x.shape[lead:])
    out_size = math.prod(dy.shape[lead:])
    if in_size <= out_size:
        # x^T [*in, *lead] . dy [*lead, *out] -> [*in, *out]
        x_t = lax.optimization_barrier(x.transpose(tuple(range(lead, x.ndim)) + lead_axes))
        dw = lax.dot_general(x_t, dy, ((tuple(range(in_dims, x.ndim)), lead_axes), ((), ())))
    else:
        # (dy^T [*out, *lead] . x [*lead, *in])^T: the transpose moves the kernel-sized result
        dy_t = lax.optimization_barrier(dy.transpose(tuple(range(lead, dy.ndim)) + lead_axes))
        dw_t = lax.optimization_barrier(
            lax.dot_general(dy_t, x, ((tuple(range(out_dims, dy.ndim)), lead_axes), ((), ()))))
        dw = dw_t.transpose(tuple(range(out_dims, kernel.ndim)) + tuple(range(out_dims)))
    return dx.astype(x.dtype), dw.astype(kernel.dtype)


_dot_cpu_backward.defvjp(_dot_fwd, _dot_bwd)


def projection_dot(x: Array, kernel: Array, in_dims: int = 1) -> Array:
    """x [*lead, *in] @ kernel [*in, *out] -> [*lead, *out] (in = the last `in_dims` dims of x).

    Same values and gradients as `lax.dot_general`; on CPU the backward transposes the smaller
    operand of the weight gradient explicitly (module docstring)."""
    if transposed_weight_grads():
        return _dot_cpu_backward(x, kernel, in_dims)
    return _forward(x, kernel, in_dims)


def dense_dot_general(lhs: Array, rhs: Array, dimension_numbers: Any,
                      precision: Any = None, preferred_element_type: Any = None) -> Array:
    """`lax.dot_general` for `nn.Dense(dot_general=...)`: a Dense's product (last dim of the
    input with the kernel's first, no batch dims, default precision) goes through
    `projection_dot`; anything else is passed to `lax.dot_general` unchanged."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
            and not lhs_batch and not rhs_batch and precision is None
            and preferred_element_type is None):
        return projection_dot(lhs, rhs, 1)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
