"""Mesh construction and logical-axis sharding rules.

Every parameter and activation names its axes logically (``("layers", "embed", "q_heads",
"head_dim")``); `LOGICAL_RULES` maps logical names to mesh axes, so the same model code runs on
any mesh. An axis whose size does not divide evenly over its mesh axes is left replicated (e.g.
one KV head with tensor=2): correct, only less memory-efficient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrlhf.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes, or None for replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
}


class MeshError(ConfigError):
    """A mesh shape (``mesh.*``) that does not fit the devices; one sentence for the user."""


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A `(data, fsdp, tensor)` mesh over ``devices`` (all devices by default).

    One size may be -1 and is filled with the remaining devices; the sizes must multiply to the
    device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise MeshError(f"mesh.{name}={size} is invalid; expected a positive size or -1.")
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise MeshError(f"mesh axes {', '.join(free)} are all -1; at most one may be -1.")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if len(devices) % known:
            raise MeshError(
                f"mesh {sizes} cannot fill {len(devices)} devices: {len(devices)} is not "
                f"divisible by {known}."
            )
        sizes[free[0]] = len(devices) // known
    total = math.prod(sizes.values())
    if total != len(devices):
        raise MeshError(
            f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} = "
            f"{total} devices, but {len(devices)} are available; the sizes must multiply to "
            "the device count."
        )
    grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None
) -> PartitionSpec:
    """PartitionSpec for logical ``axes``; replicates a dim its mesh axes don't divide."""
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        target = LOGICAL_RULES.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t not in used)
        if mesh is not None:
            targets = tuple(t for t in targets if mesh.shape[t] > 1)
            if shape is not None and shape[i] % math.prod(mesh.shape[t] for t in targets):
                targets = ()
        used.update(targets)
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def tree_shardings(mesh: Mesh, axes_tree, shapes_tree):
    """NamedShardings for a pytree given matching pytrees of logical axes and shapes."""
    return jax.tree.map(
        lambda axes, shape: named_sharding(mesh, axes, shape),
        axes_tree,
        shapes_tree,
        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(a, str | None) for a in x),
    )


def constrain(x: jax.Array, mesh: Mesh | None, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical axes; a no-op without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, x.shape))
