"""The dense layers' product x[..., *in] @ kernel[*in, *out], with a backward that suits XLA:CPU.

`projection_dot(x, kernel, in_dims)` is `lax.dot_general` contracting the last `in_dims` dims of
`x` [*lead, *in] with the first `in_dims` of `kernel` [*in, *out]: [*lead, *out]. Its forward,
values and gradients are the plain product's. Only on the CPU backend (`transposed_weight_grads`)
does its backward differ in form:

The weight gradient dW[*in, *out] = sum over *lead of x[*lead, *in] dy[*lead, *out] contracts
the leading (token) dims of both operands. XLA:CPU's matmul kernels want the contracted dim last
on the left operand and first on the right one. For the plain product XLA either copied the
larger operand into that layout (the MLP input projection's [B*T, F] gradient, 4x the size of
its [B*T, D] input) or ran the product as a plain Eigen `dot` on a transposed operand rather
than as a YNNPACK fusion (the MLP output projection). Here the smaller of x and dy is transposed
explicitly, behind an `optimization_barrier` so that XLA does not fold the transpose back into
the product, and the product is in canonical form. The backward works on the operands reshaped
to matrices, which also spares the copy XLA made of a multi-dim kernel (q's [D, N, H]) for the
input gradient. On the 2-core CPU this took gpt_small's and bert_base's train steps 6-9% faster
(in-process A/B; README, Performance).

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
    tokens = math.prod(x.shape[:lead])
    in_size, out_size = math.prod(x.shape[lead:]), math.prod(dy.shape[lead:])
    # As matrices (row-major reshapes, free): x [M, I], dy [M, O], kernel [I, O].
    x2, dy2 = x.reshape(tokens, in_size), dy.reshape(tokens, out_size)
    kernel2 = kernel.reshape(in_size, out_size)
    # dx = dy . kernel^T: XLA:CPU's kernels take a 2-D transposed right operand as it is (a
    # multi-dim one, e.g. q's [D, N, H], they copied).
    dx = lax.dot_general(dy2, kernel2, (((1,), (1,)), ((), ())))
    if in_size <= out_size:
        # dW = (x^T) . dy
        dw = lax.optimization_barrier(x2.T) @ dy2
    else:
        # dW = ((dy^T) . x)^T: the last transpose moves the kernel-sized result
        dw = lax.optimization_barrier(lax.optimization_barrier(dy2.T) @ x2).T
    return (dx.reshape(x.shape).astype(x.dtype),
            dw.reshape(kernel.shape).astype(kernel.dtype))


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
