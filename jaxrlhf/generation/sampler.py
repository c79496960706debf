"""Pure jitted prefill / decode-chunk steps over a static KV cache; `Sampler`, their host handle.

A decode chunk runs up to ``steps`` decode steps in one `lax.while_loop` on the device and stops
early once no row is active. The host owns each row's control state (`RowState`: next token,
position, counters, sampling settings, key) and sends it with every chunk; the device owns only
the KV cache, which both steps donate: it is the largest buffer and every step replaces it, so
donation lets XLA update it in place instead of allocating a second copy.

Params are arguments of every jitted step (never closed over), so `Sampler.set_params` swaps
weights without recompiling. Shapes are bucketed by the callers (powers of two), so a handful of
compilations serve every request.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from jaxrlhf.generation.sampling import MODES, Mode, row_uniforms, sample_tokens
from jaxrlhf.generation.types import MAX_STOP_TOKENS, SamplingParams
from jaxrlhf.hostio import put
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.handle import param_shardings
from jaxrlhf.models.kv_cache import (
    DecodeParams,
    KVCache,
    cache_shardings,
    decode_param_shardings,
    decode_step,
    init_cache,
    prefill,
    to_decode_params,
)
from jaxrlhf.models.sharding import logical_to_spec
from jaxrlhf.models.transformer import Params

KEY_WORDS = 2  # words of raw threefry key data per row
NO_STOP = np.iinfo(np.int32).max  # stop-id padding: never a token, out of range for the ban


class RowState(NamedTuple):
    """Per-row control state of the decode batch, `[B]` unless noted (host-owned)."""

    tokens: Any  # int32: next token to feed
    positions: Any  # int32: its position == the cache slot it is written to
    num_generated: Any  # int32: tokens sampled so far (also the RNG counter)
    max_new: Any  # int32
    min_new: Any  # int32: stop ids are banned until this many tokens exist
    temperature: Any  # float32; 0 = greedy
    top_k: Any  # int32; 0 = off
    top_p: Any  # float32; 1 = off
    stop_ids: Any  # int32 [B, MAX_STOP_TOKENS]; NO_STOP = unused entry
    keys: Any  # uint32 [B, KEY_WORDS] raw key data
    active: Any  # bool: sampling (not finished, slot in use)


class ChunkOutput(NamedTuple):
    """What one decode chunk produced: column j is step j; a row's tokens are its first
    ``num_generated_after - num_generated_before`` columns."""

    tokens: jax.Array  # int32 [B, C]
    logprobs: jax.Array  # float32 [B, C]: full softmax at the sampling temperature
    sampled_logprobs: jax.Array  # float32 [B, C]: the truncated distribution really sampled


def empty_rows(batch: int) -> RowState:
    """Host (numpy) row state with every row inactive."""
    return RowState(
        tokens=np.zeros(batch, np.int32),
        positions=np.zeros(batch, np.int32),
        num_generated=np.zeros(batch, np.int32),
        max_new=np.zeros(batch, np.int32),
        min_new=np.zeros(batch, np.int32),
        temperature=np.zeros(batch, np.float32),
        top_k=np.zeros(batch, np.int32),
        top_p=np.ones(batch, np.float32),
        stop_ids=np.full((batch, MAX_STOP_TOKENS), NO_STOP, np.int32),
        keys=np.zeros((batch, KEY_WORDS), np.uint32),
        active=np.zeros(batch, bool),
    )


def sample_key_data(seed: int, index: int) -> np.ndarray:
    """Raw key data of sample ``index`` of a request seeded with ``seed``."""
    key = jax.random.fold_in(jax.random.key(seed), index)
    return np.asarray(jax.random.key_data(key), np.uint32)


def set_row(
    rows: RowState,
    b: int,
    context: tuple[int, ...],
    num_generated: int,
    params: SamplingParams,
    stops: tuple[int, ...],
    key_data: np.ndarray,
) -> None:
    """Make host row ``b`` continue ``context`` (prompt + generated so far) in place.

    The context's last token is fed by the first decode step; the rest is in the cache.
    """
    rows.tokens[b] = context[-1]
    rows.positions[b] = len(context) - 1
    rows.num_generated[b] = num_generated
    rows.max_new[b] = params.max_new_tokens
    rows.min_new[b] = params.min_new_tokens
    rows.temperature[b] = params.temperature
    rows.top_k[b] = params.top_k
    rows.top_p[b] = params.top_p
    rows.stop_ids[b] = NO_STOP
    rows.stop_ids[b, : len(stops)] = stops
    rows.keys[b] = key_data
    rows.active[b] = True


def left_aligned(contexts: list[tuple[int, ...]], n: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Prefill inputs ``[n, t]``: each context minus its last token, left-aligned, zero-padded."""
    ids = np.zeros((n, t), np.int32)
    lengths = np.zeros(n, np.int32)
    for i, context in enumerate(contexts):
        body = context[:-1]
        ids[i, : len(body)] = body
        lengths[i] = len(body)
    return ids, lengths


def bucket(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    """The next power of two >= max(n, minimum), capped at ``maximum``."""
    size = max(int(minimum), 1)
    while size < n:
        size *= 2
    return size if maximum is None else min(size, maximum)


def sampling_mode(temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray) -> Mode:
    """The cheapest compiled variant that serves these rows."""
    sampled = temperature > 0
    if not sampled.any():
        return "greedy"
    if ((top_k[sampled] > 0) | (top_p[sampled] < 1)).any():
        return "filtered"
    return "sample"


# --------------------------------------------------------------------------- pure steps


def decode_chunk(
    dp: DecodeParams,
    cfg: TransformerConfig,
    cache: KVCache,
    rows: RowState,
    *,
    steps: int,
    mode: Mode,
    mesh: Mesh | None = None,
) -> tuple[KVCache, RowState, ChunkOutput]:
    """Up to ``steps`` decode steps for every active row; stops early when none is active."""
    B = rows.tokens.shape[0]
    outputs = ChunkOutput(
        tokens=jnp.zeros((B, steps), jnp.int32),
        logprobs=jnp.zeros((B, steps), jnp.float32),
        sampled_logprobs=jnp.zeros((B, steps), jnp.float32),
    )

    def cond(carry):
        j, _, rows, _ = carry
        return (j < steps) & jnp.any(rows.active)

    def body(carry):
        j, cache, rows, out = carry
        logits, cache = decode_step(dp, cfg, cache, rows.tokens, rows.positions, mesh)
        uniform = row_uniforms(rows.keys, rows.num_generated)
        ban = rows.num_generated < rows.min_new
        tok, lp, slp = sample_tokens(
            logits, rows.temperature, rows.top_k, rows.top_p, uniform, rows.stop_ids, ban,
            mode=mode,
        )  # fmt: skip
        active = rows.active
        count = rows.num_generated + active.astype(jnp.int32)
        stopped = jnp.any(tok[:, None] == rows.stop_ids, axis=-1) | (count >= rows.max_new)
        rows = rows._replace(
            tokens=jnp.where(active, tok, rows.tokens),
            positions=rows.positions + active.astype(jnp.int32),
            num_generated=count,
            active=active & ~stopped,
        )
        column = lambda buf, x: jax.lax.dynamic_update_slice(
            buf, jnp.where(active, x, jnp.zeros_like(x))[:, None], (0, j)
        )
        out = ChunkOutput(
            column(out.tokens, tok), column(out.logprobs, lp), column(out.sampled_logprobs, slp)
        )
        return j + 1, cache, rows, out

    _, cache, rows, outputs = jax.lax.while_loop(cond, body, (0, cache, rows, outputs))
    return cache, rows, outputs


# --------------------------------------------------------------------------- compiled steps


def _rows_shardings(mesh: Mesh | None, batch: int) -> RowState:
    if mesh is None:
        return RowState(*([SingleDeviceSharding(jax.devices()[0])] * len(RowState._fields)))

    def sharding(ndim: int) -> NamedSharding:
        axes = ("batch",) + (None,) * (ndim - 1)
        shape = (batch,) + (MAX_STOP_TOKENS,) * (ndim - 1)
        return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))

    one, two = sharding(1), sharding(2)
    return RowState(*(two if f in ("stop_ids", "keys") else one for f in RowState._fields))


def _batch2(mesh: Mesh | None, shape: tuple[int, int]):
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, logical_to_spec(("batch", None), shape, mesh))


def _replicated(mesh: Mesh | None):
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, jax.sharding.PartitionSpec())


@functools.cache
def _convert_fn(cfg: TransformerConfig, mesh: Mesh | None):
    return jax.jit(
        lambda params: to_decode_params(params, cfg),
        in_shardings=(param_shardings(cfg, mesh),),
        out_shardings=decode_param_shardings(cfg, mesh),
    )


@functools.cache
def _cache_fn(cfg: TransformerConfig, mesh: Mesh | None, batch: int, length: int):
    return jax.jit(
        lambda: init_cache(cfg, batch, length),
        out_shardings=cache_shardings(cfg, mesh, batch, length),
    )


@functools.cache
def _prefill_fn(cfg: TransformerConfig, mesh: Mesh | None, batch: int, length: int, n: int, t: int):
    caches = cache_shardings(cfg, mesh, batch, length)
    return jax.jit(
        lambda dp, cache, ids, lengths, src: prefill(dp, cfg, cache, ids, lengths, src, mesh),
        in_shardings=(
            decode_param_shardings(cfg, mesh),
            caches,
            _batch2(mesh, (n, t)),
            _replicated(mesh),
            _replicated(mesh),
        ),
        out_shardings=caches,
        donate_argnums=(1,),
    )


@functools.cache
def _decode_fn(
    cfg: TransformerConfig, mesh: Mesh | None, batch: int, length: int, steps: int, mode: Mode
):
    caches = cache_shardings(cfg, mesh, batch, length)
    rows = _rows_shardings(mesh, batch)
    out = _batch2(mesh, (batch, steps))
    return jax.jit(
        lambda dp, cache, rows: decode_chunk(
            dp, cfg, cache, rows, steps=steps, mode=mode, mesh=mesh
        ),
        in_shardings=(decode_param_shardings(cfg, mesh), caches, rows),
        out_shardings=(caches, rows, ChunkOutput(out, out, out)),
        donate_argnums=(1,),
    )


# --------------------------------------------------------------------------- host handle


class Sampler:
    """Decode-layout weights for one config and mesh, and the compiled steps that use them."""

    def __init__(self, config: TransformerConfig, params: Params, mesh: Mesh | None = None):
        self.config = config
        self.mesh = mesh
        self.params: DecodeParams = self.convert(params)

    def convert(self, params: Params) -> DecodeParams:
        """Train-layout params (any placement) -> decode layout on this sampler's mesh."""
        params = jax.device_put(params, param_shardings(self.config, self.mesh))
        return _convert_fn(self.config, self.mesh)(params)

    def new_cache(self, batch: int, length: int) -> KVCache:
        return _cache_fn(self.config, self.mesh, batch, length)()

    def prefill(
        self,
        cache: KVCache,
        ids: np.ndarray,
        lengths: np.ndarray,
        src: np.ndarray,
        params: DecodeParams | None = None,
    ) -> KVCache:
        """Write prompts (``ids [N, T]`` left-aligned) into cache rows; donates ``cache``."""
        batch, length = cache.k[0].shape[0], cache.k[0].shape[-1]
        n, t = ids.shape
        fn = _prefill_fn(self.config, self.mesh, batch, length, n, t)
        return fn(
            self.params if params is None else params,
            cache,
            put(np.asarray(ids, np.int32), _batch2(self.mesh, (n, t))),  # global over processes
            np.asarray(lengths, np.int32),
            np.asarray(src, np.int32),
        )

    def decode(
        self,
        cache: KVCache,
        rows: RowState,
        steps: int,
        mode: Mode,
        params: DecodeParams | None = None,
    ) -> tuple[KVCache, RowState, ChunkOutput]:
        """One decode chunk; donates ``cache``."""
        if mode not in MODES:
            raise ValueError(f"sampling mode {mode!r} is not one of {', '.join(MODES)}.")
        batch, length = cache.k[0].shape[0], cache.k[0].shape[-1]
        fn = _decode_fn(self.config, self.mesh, batch, length, steps, mode)
        rows = jax.tree.map(  # host rows -> global arrays (a multi-process jit takes no numpy)
            lambda x, s: put(x, s) if isinstance(x, np.ndarray) else x,
            rows, _rows_shardings(self.mesh, batch),
        )  # fmt: skip
        return fn(self.params if params is None else params, cache, rows)
