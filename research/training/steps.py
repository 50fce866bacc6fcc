"""The jitted steps: train (state donated), eval and predict, with their batch shardings.

Every step takes a global batch sharded over data x fsdp on its leading ("batch") axis
(`partitioning.global_batch`) and returns metric sums `{name: (numerator, denominator)}`
(`research.objectives.losses`) that stay on the device until the loop logs them.
"""

from __future__ import annotations

from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.errors import ConfigError
from research.objectives import losses
from research.training import partitioning
from research.training.setup import Setup, State

Batch = dict[str, jax.Array]


def batch_shardings(setup: Setup) -> dict[str, jax.sharding.NamedSharding]:
    """{batch key: sharding of its leading axis over data x fsdp}, from the objective's shapes."""
    dummy = setup.objective.dummy_batch(1, 1)
    return {k: partitioning.batch_sharding(setup.mesh, v.ndim) for k, v in dummy.items()}


def to_host(tree: Any) -> Any:
    """`tree` with every array fetched to host numpy (a device sync)."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _accumulated_grads(grad_fn: Callable, loss_fn: Callable, params: Any, batch: Batch,
                       rng: jax.Array, microbatches: int) -> tuple[Any, losses.MetricSums]:
    """(gradients, metric sums) of `batch` split into `microbatches` along the batch axis and
    summed in a scan (float32 accumulators); each microbatch folds its index into the rng."""
    split = jax.tree.map(
        lambda x: x.reshape(microbatches, x.shape[0] // microbatches, *x.shape[1:]), batch)

    def accumulate(carry, xs):
        micro, i = xs
        (_, m), g = grad_fn(params, micro, jax.random.fold_in(rng, i))
        grads, metrics = carry
        return (jax.tree.map(jnp.add, grads, g), losses.add_sums(metrics, m)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    first = jax.tree.map(lambda x: x[0], split)
    _, metric_shape = jax.eval_shape(loss_fn, params, first, rng)
    zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shape)
    (grads, metrics), _ = jax.lax.scan(accumulate, (zeros, zero_metrics),
                                       (split, jnp.arange(microbatches)))
    return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params), metrics


UPDATE_GUARDS = ("auto", "cond", "select")


@gin.configurable
def update_guard(kind: str = "auto", backend: str | None = None) -> str:
    """How a non-finite step keeps params and optimizer state: 'cond' or 'select'.

    'cond' (`lax.cond`) skips the optimizer update on a bad step; a finite step reads params
    and optimizer state once. 'select' always computes the update and keeps the old values with
    `where`, which XLA fuses into the update's own kernels. 'auto' (gin:
    `update_guard.kind`) takes 'cond' on the CPU, where it was measured to help (gpt_small
    step 4.81 -> 4.60 s on 2 cores), and 'select' on GPU/TPU: XLA:GPU reads a conditional's
    predicate back to the host, which stalls the step until the backward pass is done and
    launches the optimizer's kernels one by one outside any CUDA graph.
    """
    if kind not in UPDATE_GUARDS:
        raise ConfigError(f"update_guard.kind={kind!r} is not one of {UPDATE_GUARDS}.")
    if kind != "auto":
        return kind
    return "cond" if (backend or jax.default_backend()) == "cpu" else "select"


def make_train_step(setup: Setup, microbatches: int = 1, guard: str | None = None):
    """The jitted update: (state, batch) -> (state, metric sums). The state is donated.

    A step whose loss or gradient norm is NaN/Inf leaves params and optimizer state unchanged
    (only the step counter moves) and reports metrics["nonfinite"] = (1, 1); the loop then stops
    or counts the skip (train.on_nonfinite). No extra host sync: the flag rides with the metrics.
    How the old values are kept is `guard` ('cond', 'select'; None: `update_guard()`'s choice, a
    branch on CPU and a select on GPU/TPU).
    """
    objective, model, optimizer = setup.objective, setup.model, setup.optimizer
    guard = update_guard() if guard is None else update_guard(guard)

    def step_fn(state: State, batch: Batch):
        rng = jax.random.fold_in(state["rng"], state["step"])
        normalizers = objective.normalizers(batch)

        def micro_loss(params, micro, micro_rng):
            return objective.loss(model, params, micro, micro_rng, normalizers, deterministic=False)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        if microbatches == 1:
            (_, metrics), grads = grad_fn(state["params"], batch, rng)
        else:
            grads, metrics = _accumulated_grads(grad_fn, micro_loss, state["params"], batch, rng,
                                                microbatches)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"][0]) & jnp.isfinite(grad_norm)

        def apply_update(_):
            updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
            return optax.apply_updates(state["params"], updates), opt_state

        keep = (state["params"], state["opt_state"])
        if guard == "cond":
            params, opt_state = jax.lax.cond(finite, apply_update, lambda _: keep, None)
        else:
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                             apply_update(None), keep)
        one = jnp.ones((), jnp.float32)
        metrics = dict(metrics)
        metrics["grad_norm"] = (grad_norm, one)
        metrics["nonfinite"] = (1.0 - finite.astype(jnp.float32), one)
        metrics["learning_rate"] = (setup.schedule(state["step"]), one)
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                     "rng": state["rng"]}
        return new_state, metrics

    return jax.jit(step_fn, in_shardings=(setup.state_shardings, batch_shardings(setup)),
                   out_shardings=(setup.state_shardings, None), donate_argnums=(0,))


def make_eval_step(setup: Setup):
    """The jitted eval: (params, batch) -> metric sums (dropout off)."""
    objective, model = setup.objective, setup.model

    def eval_fn(params, batch):
        normalizers = objective.normalizers(batch)
        _, metrics = objective.loss(model, params, batch, jax.random.key(0), normalizers,
                                    deterministic=True)
        return metrics

    return jax.jit(eval_fn, in_shardings=(setup.state_shardings["params"], batch_shardings(setup)))


def make_predict_step(setup: Setup):
    """Jitted (params, batch) -> per-example outputs incl. label/weight/index, for task metrics
    (objectives with `has_predictions`)."""
    objective, model = setup.objective, setup.model

    def predict_fn(params, batch):
        out = objective.predict(model, params, batch)
        return {**out, "label": batch["label"], "weight": batch["weight"], "index": batch["index"]}

    return jax.jit(predict_fn, in_shardings=(setup.state_shardings["params"], batch_shardings(setup)))
