"""Input checks at the algorithm boundary: static (trace-time) shape and argument errors.

Shapes are asserted with chex; its AssertionError becomes a one-sentence ValueError naming the
function and every shape, so a user sees which argument is wrong.
"""

from __future__ import annotations

import numbers

import chex
import jax
import jax.numpy as jnp


def check_same_shape(fn: str, ndim: int | None = None, **arrays: jax.Array | None) -> None:
    """Raise ValueError naming every shape unless all non-None arrays share one shape (of rank
    ``ndim`` when given)."""
    given = {k: v for k, v in arrays.items() if v is not None}
    if not given:
        return
    try:
        chex.assert_equal_shape(list(given.values()))
        if ndim is not None:
            chex.assert_rank(list(given.values()), ndim)
    except AssertionError:
        listed = ", ".join(f"{k} {jnp.shape(v)}" for k, v in given.items())
        want = f"{ndim}-D arrays of one shape" if ndim is not None else "arrays of one shape"
        raise ValueError(f"{fn}: expected {want}, got {listed}.") from None


def check_rows(fn: str, rows: str, row_b: jax.Array | None, grid: str, grid_bt: jax.Array) -> None:
    """Raise ValueError unless ``grid_bt`` is ``[B, T]`` and ``row_b`` (if given) is ``[B]``."""
    try:
        chex.assert_rank(grid_bt, 2)
        if row_b is not None:
            chex.assert_shape(row_b, jnp.shape(grid_bt)[:1])
    except AssertionError:
        got = f"{grid} {jnp.shape(grid_bt)}"
        got += "" if row_b is None else f" and {rows} {jnp.shape(row_b)}"
        raise ValueError(f"{fn}: expected {rows} [B] and {grid} [B, T], got {got}.") from None


def check_rank(fn: str, name: str, x: jax.Array, ndim: int) -> None:
    """Raise ValueError unless ``x`` has rank ``ndim``."""
    try:
        chex.assert_rank(x, ndim)
    except AssertionError:
        raise ValueError(f"{fn}: expected {ndim}-D {name}, got shape {jnp.shape(x)}.") from None


def is_number(x: object) -> bool:
    """True for a concrete Python/NumPy number (hyper-parameters we can validate eagerly)."""
    return isinstance(x, numbers.Real)


def compute_dtype(*arrays: jax.Array | None) -> jnp.dtype:
    """At least float32, so bf16 log-probs do not lose the ratio's precision."""
    dts = [jnp.result_type(a) for a in arrays if a is not None]
    return jnp.result_type(jnp.float32, *dts)
