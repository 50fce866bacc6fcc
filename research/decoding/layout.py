"""Where decoding runs: a device mesh and the logical-axis rules that place parameters,
activations and the KV cache on it (the same rules training uses,
`research.training.partitioning`).

Parameters take the run's rules (e.g. fsdp_tensor: heads, mlp and vocab over `tensor`, embed
over `fsdp`), so a model larger than one device's memory decodes. The KV cache, key/value
[B, K, S, H] (heads-major), is sharded over batch (`act_batch`: data x fsdp) and kv heads
(`act_kv_heads`: tensor); a dimension a mesh axis does not divide stays unsharded.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import logging
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from research import workdir as workdir_lib
from research.errors import ConfigError
from research.training import partitioning

# Logical names of the KV cache leaves (research.models.attention.Attention._update_cache),
# after any leading scan 'layers' axis. Other leaves: batch first, the rest replicated.
CACHE_AXES = {
    "cached_key": ("act_batch", "act_kv_heads", "act_length", None),
    "cached_value": ("act_batch", "act_kv_heads", "act_length", None),
    "cached_segment_ids": ("act_batch", "act_length"),
    "cache_index": (),
}


def _hashable(rules: Any) -> tuple:
    """Rules as nested tuples (gin may give lists), so a Layout can key jit's cache."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh (axes data, fsdp, tensor) and logical-axis rules. Hashable: the jitted decoding
    functions take it as a static argument, so each layout compiles once."""

    mesh: Mesh
    rules: tuple

    @classmethod
    def create(cls, mesh_shape: dict[str, int] | None = None, rules: Any = None,
               devices: list | None = None) -> "Layout":
        """A layout over `devices` (default: all) shaped `mesh_shape` (default: every device
        on `tensor`), with `rules` (default: the fsdp_tensor preset)."""
        devices = list(devices if devices is not None else jax.devices())
        mesh = partitioning.make_mesh(mesh_shape or {"tensor": -1}, devices)
        return cls(mesh, _hashable(rules if rules is not None
                                   else partitioning.logical_axis_rules()))

    @classmethod
    def single_device(cls) -> "Layout":
        """The first device alone (nothing sharded)."""
        return cls.create({}, devices=jax.devices()[:1])

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The mesh and rules in force while decoding functions trace and run."""
        with partitioning.mesh_rules(self.mesh, self.rules):
            yield

    def sharding(self, logical: tuple, shape: tuple[int, ...], what: str = "") -> NamedSharding:
        """The NamedSharding of an array of `shape` whose dims have the `logical` names
        (mesh axes that do not divide their dim are dropped)."""
        spec = nn.logical_to_mesh_axes(logical, self.rules)
        return NamedSharding(self.mesh, partitioning._fit_spec(spec, shape, self.mesh, what))

    def batch(self, x: np.ndarray) -> jax.Array:
        """A batch-major host array [B, ...] on the mesh, split over act_batch."""
        return jax.device_put(x, self.sharding(("act_batch",) + (None,) * (x.ndim - 1), x.shape))

    def param_shardings(self, model: nn.Module) -> Any:
        """NamedShardings of `model`'s parameters by their logical names (an unboxed tree)."""
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                  jnp.zeros((1, 1), jnp.int32))["params"])
        return partitioning.logical_to_shardings(boxed, self.mesh, self.rules)

    def put_params(self, model: nn.Module, params: Any) -> Any:
        """`params` (host or device arrays) placed by `param_shardings`."""
        return jax.device_put(params, self.param_shardings(model))

    def constrain_cache(self, cache: Any) -> Any:
        """The KV cache with each leaf's sharding constrained (inside jit): batch over
        act_batch, kv heads over act_kv_heads, a scan 'layers' axis unsharded."""

        def constrain(path, x):
            name = getattr(path[-1], "key", None)
            base = CACHE_AXES.get(name)
            if base is None:  # a leaf this module does not know: batch first, rest replicated
                rank = x.ndim - scan_axes(path, x)
                base = ("act_batch",) + (None,) * (rank - 1) if rank else ()
            logical = (None,) * (x.ndim - len(base)) + base
            return jax.lax.with_sharding_constraint(x, self.sharding(logical, x.shape, str(name)))

        return jax.tree_util.tree_map_with_path(constrain, cache)


def scan_axes(path, x) -> int:
    """1 if the leaf sits under a scanned `layers` module (leading [L] axis), else 0."""
    return int(any(getattr(p, "key", None) == "layers" for p in path) and x.ndim > 0)


def cache_length_axis(path, x) -> int:
    """The position axis of a KV cache leaf with positions (key/value [B, K, S, H], segment
    ids [B, S], after any scan 'layers' axis)."""
    name = getattr(path[-1], "key", None)
    return scan_axes(path, x) + CACHE_AXES.get(name, ("act_batch", "act_length")).index(
        "act_length")


def run_rules(workdir: str, preset: str | None = None) -> tuple:
    """The logical-axis rules of the run in `workdir`: its config.gin's
    `logical_axis_rules.preset` / `.overrides` (the default preset where it binds none or has
    no config.gin, e.g. a converted checkpoint); `preset` replaces the run's preset."""
    text = workdir_lib.read_config(workdir) or ""
    bindings = {k.rsplit("/", 1)[-1]: v
                for k, v in workdir_lib.parse_operative_config(text).items()}
    kwargs = {}
    for field in ("preset", "overrides"):
        value = bindings.get(f"logical_axis_rules.{field}")
        if value is not None:
            try:
                kwargs[field] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                logging.warning("%s: logical_axis_rules.%s = %s is not a literal; using the "
                                "default.", workdir, field, value)
    if preset is not None:
        kwargs["preset"] = preset
    try:
        return _hashable(partitioning.logical_axis_rules(**kwargs))
    except ConfigError as err:
        raise ConfigError(f"{err} (--rules)") from err


def mesh_shape_arg(text: str) -> dict[str, int]:
    """A --mesh_shape flag's value: a dict literal of axis sizes such as
    "{'data': 2, 'tensor': 4}" (-1: the remaining devices)."""
    try:
        shape = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        shape = None
    if not isinstance(shape, dict) or not all(isinstance(v, int) for v in shape.values()):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a dict of axis sizes, e.g. \"{{'data': 2, 'tensor': 4}}\"")
    return shape
