"""Device mesh and logical-axis rules.

The mesh always has the three axes `data`, `fsdp`, `tensor` (size 1 where unused), so one
set of rules serves every mesh shape. Rules map the model's logical axis names (see
`research.models.transformer`) to mesh axes; three presets cover the usual layouts:

  data_parallel: parameters replicated, batch split over data x fsdp.
  fsdp:          parameters (and optimizer state) split over `fsdp` along `embed`; batch over data x fsdp.
  fsdp_tensor:   fsdp plus Megatron-style tensor parallelism: heads, mlp and vocab over `tensor`.

A dimension that a mesh axis does not divide stays unsharded (logged once), so e.g. MQA's
single kv head is replicated instead of failing.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from research.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, Any]]

_ACTIVATIONS_DP: Rules = (
    ("act_batch", BATCH_AXES), ("act_length", None), ("act_embed", None), ("act_mlp", None),
    ("act_heads", None), ("act_kv_heads", None), ("act_vocab", None),
)
_TENSOR_ACTIVATIONS: Rules = (
    ("act_batch", BATCH_AXES), ("act_length", None), ("act_embed", None), ("act_mlp", "tensor"),
    ("act_heads", "tensor"), ("act_kv_heads", "tensor"), ("act_vocab", "tensor"),
)
_UNSHARDED_PARAMS = ("layers", "head_dim", "position", "type_vocab", "classes")

RULE_PRESETS: dict[str, Rules] = {
    "data_parallel": (
        *_ACTIVATIONS_DP,
        *((name, None) for name in ("vocab", "embed", "mlp", "heads", "kv_heads") + _UNSHARDED_PARAMS),
    ),
    "fsdp": (
        *_ACTIVATIONS_DP,
        ("embed", "fsdp"),
        *((name, None) for name in ("vocab", "mlp", "heads", "kv_heads") + _UNSHARDED_PARAMS),
    ),
    "fsdp_tensor": (
        *_TENSOR_ACTIVATIONS,
        ("embed", "fsdp"), ("vocab", "tensor"), ("mlp", "tensor"), ("heads", "tensor"),
        ("kv_heads", "tensor"),
        *((name, None) for name in _UNSHARDED_PARAMS),
    ),
}


@gin.configurable
def logical_axis_rules(preset: str = "fsdp_tensor", overrides: Rules = ()) -> Rules:
    """The rules in force: a preset, with `overrides` (name, mesh axes) pairs taking precedence."""
    if preset not in RULE_PRESETS:
        raise ConfigError(f"logical_axis_rules.preset={preset!r} is unknown; choose one of "
                          f"{sorted(RULE_PRESETS)}.")
    names = {name for name, _ in overrides}
    return tuple(overrides) + tuple(r for r in RULE_PRESETS[preset] if r[0] not in names)


def resolve_mesh_shape(mesh_shape: dict[str, int], num_devices: int) -> dict[str, int]:
    """Fills in a -1 axis and checks the product equals the device count (ConfigError naming
    MESH_SHAPE and the fix otherwise)."""
    unknown = set(mesh_shape) - set(MESH_AXES)
    if unknown:
        raise ConfigError(f"MESH_SHAPE has unknown axes {sorted(unknown)}; the axes are "
                          f"{MESH_AXES}, e.g. {{'data': 2, 'fsdp': 2, 'tensor': 2}}.")
    shape = {axis: int(mesh_shape.get(axis, 1)) for axis in MESH_AXES}
    free = [a for a, n in shape.items() if n == -1]
    if len(free) > 1:
        raise ConfigError(f"MESH_SHAPE={mesh_shape}: at most one axis may be -1.")
    if any(n == 0 or n < -1 for n in shape.values()):
        raise ConfigError(f"MESH_SHAPE={mesh_shape}: axis sizes must be positive (or one -1).")
    known = math.prod(n for n in shape.values() if n != -1)
    if free:
        if num_devices % known:
            raise ConfigError(f"MESH_SHAPE={mesh_shape}: {num_devices} devices are not divisible "
                              f"by the fixed axes' product {known}; set the axis sizes so they "
                              "divide it.")
        shape[free[0]] = num_devices // known
    if math.prod(shape.values()) != num_devices:
        raise ConfigError(
            f"MESH_SHAPE={mesh_shape} needs {math.prod(shape.values())} devices but "
            f"{num_devices} are available; make the axis sizes multiply to {num_devices} or set "
            "one axis to -1, e.g. --gin.MESH_SHAPE=\"{'data': -1}\".")
    return shape


def make_mesh(mesh_shape: dict[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh over all (or the given) devices with axes data, fsdp, tensor."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    dims = tuple(shape[a] for a in MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(dims, devices=devices)
    except Exception:  # noqa: BLE001 - irregular device sets (CPU, subsets): plain reshape
        grid = np.asarray(devices).reshape(dims)
    return Mesh(grid, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh, what: str) -> P:
    """Drops mesh axes that do not divide their dimension (they would fail to shard)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        if names and dim % size:
            logging.info("%s: dim %d is not divisible by mesh axes %s (%d); left unsharded.",
                         what, dim, names, size)
            names = ()
        fitted.append(names[0] if len(names) == 1 else (names or None))
    return P(*fitted)


def logical_to_shardings(abstract_boxed: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a (boxed, abstract) variable tree whose leaves carry logical names."""
    specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_boxed), rules)
    shapes = nn.unbox(abstract_boxed)
    paths = jax.tree_util.tree_map_with_path(lambda p, _: jax.tree_util.keystr(p), shapes)
    return jax.tree.map(
        lambda spec, x, path: NamedSharding(mesh, _fit_spec(spec, x.shape, mesh, path)),
        specs, shapes, paths, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch-major arrays: leading dim over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles per-host batch shards into global arrays sharded over data x fsdp."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
            for k, v in local.items()}


@contextlib.contextmanager
def mesh_rules(mesh: Mesh, rules: Rules):
    """The mesh and logical-axis rules in force while tracing/running sharded code."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
