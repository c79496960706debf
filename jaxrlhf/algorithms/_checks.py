"""Input checks at the algorithm boundary: static (trace-time) shape and argument errors."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp


def check_same_shape(fn: str, ndim: int | None = None, **arrays: jax.Array | None) -> None:
    """Raise ValueError naming every shape unless all non-None arrays share one shape."""
    given = {k: jnp.shape(v) for k, v in arrays.items() if v is not None}
    shapes = set(given.values())
    bad_rank = ndim is not None and any(len(s) != ndim for s in shapes)
    if len(shapes) > 1 or bad_rank:
        listed = ", ".join(f"{k} {s}" for k, s in given.items())
        want = f"{ndim}-D arrays of one shape" if ndim is not None else "arrays of one shape"
        raise ValueError(f"{fn}: expected {want}, got {listed}.")


def is_number(x: object) -> bool:
    """True for a concrete Python/NumPy number (hyper-parameters we can validate eagerly)."""
    return isinstance(x, numbers.Real)


def compute_dtype(*arrays: jax.Array | None) -> jnp.dtype:
    """At least float32, so bf16 log-probs do not lose the ratio's precision."""
    dts = [jnp.result_type(a) for a in arrays if a is not None]
    return jnp.result_type(jnp.float32, *dts)
