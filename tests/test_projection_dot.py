"""`research.models.projection_dot`: the dense layers' product with XLA:CPU's backward.

Values and gradients against numpy (float64) for every shape the models use, and the point of
it checked in XLA:CPU's optimised HLO: the weight gradient's product takes its operands in
canonical form (no transposed-operand `dot`) and only the smaller operand is copied.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import research.models.projection_dot as projection_dot_module
from research.models.projection_dot import dense_dot_general, projection_dot

# (x shape, kernel shape, in_dims): the MLP's up (D < F: x is the smaller operand of dW) and down
# (F > D: dy is) projections, q/k/v [B, T, D] -> [B, T, N, H], the attention output
# [B, T, N, H] -> [B, T, D], a 2-D input and a 3-D token layout.
CASES = [
    ((2, 8, 16), (16, 48), 1),
    ((2, 8, 48), (48, 16), 1),
    ((2, 8, 16), (16, 4, 8), 1),
    ((2, 8, 4, 8), (4, 8, 16), 2),
    ((10, 24), (24, 12), 1),
    ((2, 3, 5, 12), (12, 20), 1),
]


@pytest.fixture(params=[True, False], ids=["cpu_backward", "plain"])
def backward(request, monkeypatch):
    """Runs a test with projection_dot's CPU backward on, then with the plain product."""
    monkeypatch.setattr(projection_dot_module, "transposed_weight_grads",
                        lambda backend=None: request.param)
    return request.param


def numpy_reference(x, kernel, cotangent, in_dims):
    """(y, dx, dkernel) of y = x . kernel for the cotangent, in float64 numpy."""
    x, kernel, cotangent = (np.asarray(a, np.float64) for a in (x, kernel, cotangent))
    lead = x.ndim - in_dims
    tokens = int(np.prod(x.shape[:lead]))
    x2 = x.reshape(tokens, -1)
    k2 = kernel.reshape(x2.shape[1], -1)
    g2 = cotangent.reshape(tokens, -1)
    y = (x2 @ k2).reshape(x.shape[:lead] + kernel.shape[in_dims:])
    return y, (g2 @ k2.T).reshape(x.shape), (x2.T @ g2).reshape(kernel.shape)


@pytest.mark.parametrize("x_shape,kernel_shape,in_dims", CASES)
def test_values_and_gradients_match_numpy(backward, x_shape, kernel_shape, in_dims):
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape)
    kernel = jax.random.normal(kk, kernel_shape)
    lead = len(x_shape) - in_dims
    cotangent = jax.random.normal(kg, x_shape[:lead] + kernel_shape[in_dims:])
    y, vjp = jax.vjp(lambda a, b: projection_dot(a, b, in_dims), x, kernel)
    dx, dkernel = vjp(cotangent)
    want_y, want_dx, want_dkernel = numpy_reference(x, kernel, cotangent, in_dims)
    assert y.shape == want_y.shape and dx.shape == x.shape and dkernel.shape == kernel.shape
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dkernel, want_dkernel, rtol=1e-5, atol=1e-5)


def test_gradient_dtypes_follow_the_operands(backward):
    """bf16 compute: the gradients come back in each operand's dtype and equal float32's on the
    same (bf16-rounded) inputs up to two bf16 roundings (the product's and the gradient's)."""
    x = jax.random.normal(jax.random.key(1), (2, 8, 16)).astype(jnp.bfloat16)
    kernel = jax.random.normal(jax.random.key(2), (16, 48)).astype(jnp.bfloat16)

    def loss(a, b):
        return jnp.sum(projection_dot(a, b).astype(jnp.float32) ** 2)

    grads = jax.grad(loss, argnums=(0, 1))(x, kernel)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]
    refs = jax.grad(loss, argnums=(0, 1))(x.astype(jnp.float32), kernel.astype(jnp.float32))
    for grad, ref in zip(grads, refs):
        bound = 2.0 ** -7 * float(jnp.abs(ref).max())
        np.testing.assert_allclose(np.asarray(grad, np.float32), ref, rtol=0, atol=bound)


def test_dense_dot_general_routes_only_a_dense_product(monkeypatch):
    calls = []
    monkeypatch.setattr(projection_dot_module, "projection_dot",
                        lambda x, k, in_dims: calls.append(in_dims) or x @ k)
    x, kernel = jnp.ones((3, 4)), jnp.ones((4, 5))
    dense_dot_general(x, kernel, (((1,), (0,)), ((), ())))
    assert calls == [1]
    # Batch dims, another contraction or an explicit precision: plain lax.dot_general.
    batched = dense_dot_general(jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5)), (((2,), (1,)), ((0,), (0,))))
    transposed = dense_dot_general(x, jnp.ones((5, 4)), (((1,), (1,)), ((), ())))
    precise = dense_dot_general(x, kernel, (((1,), (0,)), ((), ())),
                                precision=jax.lax.Precision.HIGHEST)
    assert calls == [1]
    assert batched.shape == (2, 3, 5) and transposed.shape == (3, 5) and precise.shape == (3, 5)
    np.testing.assert_allclose(precise, np.full((3, 5), 4.0))


def test_only_the_cpu_backend_uses_the_transposed_backward():
    assert projection_dot_module.transposed_weight_grads("cpu")
    assert not projection_dot_module.transposed_weight_grads("gpu")
    assert not projection_dot_module.transposed_weight_grads("tpu")


def optimized_entry(x, kernel, in_dims: int = 1) -> list[str]:
    """The ENTRY instructions of XLA:CPU's optimised HLO of the product's forward + backward."""
    grad = jax.jit(jax.grad(lambda a, b: jnp.sum(projection_dot(a, b, in_dims) ** 2),
                            argnums=(0, 1)))
    text = grad.lower(x, kernel).compile().as_text()
    return [line for line in text[text.index("\nENTRY"):].splitlines() if " = " in line]


def elements(line: str) -> int:
    shape = re.search(r"= \w+\[([\d,]*)\]", line).group(1)
    return int(np.prod([int(d) for d in shape.split(",") if d]))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA:CPU's HLO")
@pytest.mark.parametrize("x_shape,kernel_shape", [((4, 16, 32), (32, 128)),
                                                  ((4, 16, 128), (128, 32))],
                         ids=["up_projection", "down_projection"])
def test_cpu_weight_gradient_copies_only_the_smaller_operand(x_shape, kernel_shape):
    """XLA:CPU's plain backward (jax 0.10.2) either copies the larger of x / dy into the layout
    its kernels want (up projection) or runs the weight gradient as a plain `dot` on a transposed
    operand (down projection); with the CPU backward every product is canonical and nothing the
    size of the larger operand is copied."""
    assert projection_dot_module.transposed_weight_grads()
    x = jnp.ones(x_shape)
    kernel = jnp.ones(kernel_shape)
    entry = optimized_entry(x, kernel)
    tokens = int(np.prod(x_shape[:-1]))
    larger = tokens * max(kernel_shape)
    transposed_dots = [line for line in entry
                       if re.search(r" dot\(", line) and "lhs_contracting_dims={0}" in line]
    big_copies = [line for line in entry if re.search(r"%\S*(copy|transpose)\S* = ", line)
                  and elements(line) >= larger]
    assert not transposed_dots, transposed_dots
    assert not big_copies, big_copies


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA:CPU's HLO")
@pytest.mark.parametrize("x_shape,kernel_shape,in_dims", [((4, 16, 32), (32, 4, 8), 1),
                                                          ((4, 16, 4, 8), (4, 8, 32), 2)],
                         ids=["qkv_projection", "attention_output"])
def test_cpu_backward_does_not_copy_a_multi_dim_kernel(x_shape, kernel_shape, in_dims):
    """The input gradient contracts a multi-dim kernel's feature dims; as matrices, XLA:CPU
    takes the kernel as it is (for the N-D product it copied it, transposed)."""
    assert projection_dot_module.transposed_weight_grads()
    entry = optimized_entry(jnp.ones(x_shape), jnp.ones(kernel_shape), in_dims)
    kernel_copies = [line for line in entry if re.search(r"%\S*(copy|transpose)\S* = ", line)
                     and elements(line) == int(np.prod(kernel_shape))]
    assert not kernel_copies, kernel_copies
