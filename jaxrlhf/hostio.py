"""Host <-> device transfers that work in single- and multi-process runs.

In a multi-process run a batch-sharded `jax.Array` is not fully addressable: no process holds
all of it, so ``np.asarray`` fails. `fetch` gathers such arrays (a collective: every process
must call it on the same arrays in the same order) and `put` builds a global array from the
global host value, each process copying only the shards its devices hold. In a single process
both are the plain ``device_get`` / ``device_put``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def _fetch_leaf(x: Any) -> Any:
    if not isinstance(x, jax.Array):
        return x
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:  # every process holds the whole value
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def fetch(tree: Any) -> Any:
    """Every `jax.Array` leaf of ``tree`` as a numpy array of its global value."""
    return jax.tree.map(_fetch_leaf, tree)


def put(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """The global host array ``value`` (the same on every process) laid out as ``sharding``."""
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    arr = np.asarray(value)
    return jax.make_array_from_callback(arr.shape, sharding, lambda index: arr[index])
