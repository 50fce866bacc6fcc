"""Everything a run builds before its first step: tokenizer, model, mesh, optimizer and the
sharded train state (created already sharded: `jit(init, out_shardings=...)`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from research.checkpoints import manager as checkpointing
from research.data.tokenizer import load_tokenizer
from research.errors import ConfigError
from research.models.transformer import TransformerConfig
from research.objectives.base import Objective
from research.training import partitioning
from research.training.optim import make_optimizer

State = dict[str, Any]  # {"step": int32[], "params": ..., "opt_state": ..., "rng": key[]}


@dataclasses.dataclass
class Setup:
    """Everything derived from the config that the loop, the tests and the tools reuse."""

    cfg: TransformerConfig  # the model config with the tokenizer's vocab_size
    objective: Objective  # bound to cfg (`Objective.for_model`)
    model: nn.Module
    tokenizer: Any
    mesh: jax.sharding.Mesh
    rules: Any  # logical axis name -> mesh axes
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: Any  # a State of NamedShardings
    abstract_state: Any  # a State of ShapeDtypeStructs carrying those shardings
    init_state: Any  # jitted: () -> sharded State


def build_setup(*, model_config: TransformerConfig, objective: Objective, vocab: str,
                seq_len: int, batch_size: int, seed: int, mesh_shape: dict, learning_rate: float,
                num_steps: int, warmup_steps: int, devices: list | None = None) -> Setup:
    """Model, mesh, optimizer and the sharded state initializer for a run.

    `devices` restricts the mesh to a subset (tests compare 1 device with 8). `batch_size` is
    not used here (see `check_batch_size`); it is accepted so callers pass one run's values.
    """
    del batch_size
    tokenizer = load_tokenizer(vocab)
    tokenizer.require_special(*objective.required_special_pieces)
    cfg = model_config.with_vocab(tokenizer.vocab_size).resolved()
    if cfg.max_len < seq_len and cfg.position == "learned":
        raise ConfigError(f"SEQ_LEN={seq_len} exceeds TransformerConfig.max_len={cfg.max_len} "
                          f"(learned position embeddings): pass --gin.SEQ_LEN={cfg.max_len} or "
                          "less, or a model config with a larger max_len.")
    mesh = partitioning.make_mesh(mesh_shape, devices)
    rules = partitioning.logical_axis_rules()
    objective = objective.for_model(cfg)
    model = objective.make_model(cfg)
    optimizer, schedule = make_optimizer(learning_rate, num_steps, warmup_steps)
    dummy = objective.dummy_batch(1, seq_len)

    def init_boxed(rng):
        params_rng, dropout_rng = jax.random.split(rng)
        return objective.init(model, {"params": params_rng, "dropout": dropout_rng}, dummy)["params"]

    base_rng = jax.random.key(seed)
    # Initialisation runs outside the mesh context: out_shardings below decide the layout.
    abstract_boxed = jax.eval_shape(init_boxed, base_rng)
    param_shardings = partitioning.logical_to_shardings(abstract_boxed, mesh, rules)
    abstract_params = nn.unbox(abstract_boxed)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    repl = partitioning.replicated(mesh)
    opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, param_shardings,
                                          transform_non_params=lambda _: repl)
    state_shardings = {"step": repl, "params": param_shardings, "opt_state": opt_shardings, "rng": repl}

    def init_state() -> State:
        params = nn.unbox(init_boxed(jax.random.fold_in(base_rng, 0)))
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": optimizer.init(params), "rng": base_rng}

    abstract_state = jax.eval_shape(init_state)
    abstract_state = checkpointing.abstract_like(abstract_state, state_shardings)
    init_fn = jax.jit(init_state, out_shardings=state_shardings)
    return Setup(cfg, objective, model, tokenizer, mesh, rules, optimizer, schedule,
                 state_shardings, abstract_state, init_fn)


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, microbatches: int) -> None:
    """ConfigError unless BATCH_SIZE splits evenly over the data-parallel devices x
    microbatches and over the processes."""
    dp = partitioning.data_parallel_size(mesh)
    if batch_size % (dp * microbatches):
        raise ConfigError(
            f"BATCH_SIZE={batch_size} must be divisible by the data-parallel size ({dp} = data x fsdp "
            f"of MESH_SHAPE) times train.microbatches ({microbatches}); use a multiple of "
            f"{dp * microbatches}.")
    if batch_size % jax.process_count():
        raise ConfigError(f"BATCH_SIZE={batch_size} must be divisible by the "
                          f"{jax.process_count()} processes (each host reads an equal share); "
                          f"use a multiple of {jax.process_count()}.")
