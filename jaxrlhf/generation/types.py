"""Request and result types of the generation engine, and the request validation all paths share."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

FINISH_REASONS = ("stop", "length", "abort")
MAX_STOP_TOKENS = 8  # stop ids per row (EOS included); a fixed width keeps one compiled shape


class InvalidRequestError(ValueError):
    """A request the engine cannot run; the message names the bad field in one sentence."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's ``n`` completions.

    ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` are off. ``seed`` makes the
    samples reproducible whatever the batching (None: the server picks one). The model's EOS ends
    a completion unless ``ignore_eos``; ``stop_token_ids`` end it too.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    seed: int | None = None
    sample_offset: int = 0  # sample j draws key fold_in(key(seed), sample_offset + j)

    @classmethod
    def from_config(cls, gen, **overrides) -> SamplingParams:
        """From a `jaxrlhf.config.GenerationConfig` (``n_samples`` -> ``n``)."""
        values = dict(
            max_new_tokens=gen.max_new_tokens,
            temperature=gen.temperature,
            top_p=gen.top_p,
            top_k=gen.top_k or 0,
            min_new_tokens=gen.min_new_tokens,
            stop_token_ids=tuple(gen.stop_token_ids),
            n=gen.n_samples,
        )
        return cls(**(values | overrides))


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generated sequence. Arrays are `[length]`; the stop token, if any, is included."""

    tokens: np.ndarray  # int32
    logprobs: np.ndarray  # float32: full softmax at the temperature (the behaviour log-prob)
    sampled_logprobs: np.ndarray  # float32: the truncated (top-k / top-p) distribution sampled
    versions: np.ndarray  # int32: policy version of the weights that produced each token
    finish_reason: str  # "stop" | "length" | "abort"


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """A finished request: its prompt and its ``n`` completions in sample order."""

    request_id: str
    prompt_ids: tuple[int, ...]
    completions: tuple[Completion, ...]


def stop_ids(params: SamplingParams, eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    """EOS (unless ignored) plus the request's stop ids, deduplicated in order."""
    eos: tuple[int, ...] = ()
    if eos_token_id is not None and not params.ignore_eos:
        eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    return tuple(dict.fromkeys(eos + tuple(params.stop_token_ids)))


def validate_request(
    prompt: Sequence[int],
    params: SamplingParams,
    *,
    vocab_size: int,
    max_seq_len: int | None,
    eos_token_id: int | Sequence[int] | None = None,
    max_positions: int | None = None,
) -> tuple[int, ...]:
    """Check a request; return its prompt as a tuple of ints or raise `InvalidRequestError`.

    Token ids must be integers (a float is refused, never truncated) in ``[0, vocab_size)``;
    the prompt plus ``max_new_tokens`` - 1 fed tokens must fit both ``max_positions`` (the
    model's ``max_position_embeddings``) and ``max_seq_len`` (the cache); ``seed`` must fit
    JAX's 64-bit seed and ``sample_offset + n`` the 32-bit sample index.
    """
    if not isinstance(params, SamplingParams):
        raise InvalidRequestError(
            f"sampling params must be a SamplingParams, got {type(params).__name__}."
        )
    ids = prompt_token_ids(prompt)
    if not ids:
        raise InvalidRequestError("prompt is empty; at least one token is required.")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"prompt token id {bad[0]} is outside [0, {vocab_size}).")
    _check_int("max_new_tokens", params.max_new_tokens, 1)
    _check_int("min_new_tokens", params.min_new_tokens, 0)
    if params.min_new_tokens > params.max_new_tokens:
        raise InvalidRequestError(
            f"min_new_tokens={params.min_new_tokens} is more than "
            f"max_new_tokens={params.max_new_tokens}."
        )
    _check_int("top_k", params.top_k, 0)
    _check_int("n", params.n, 1)
    _check_int("sample_offset", params.sample_offset, 0)
    if params.sample_offset + params.n > SAMPLE_INDEX_END:
        raise InvalidRequestError(
            f"sample_offset={params.sample_offset} + n={params.n} exceeds the sample index "
            f"limit 2**32."
        )
    t = params.temperature
    if not _is_real(t) or not math.isfinite(t) or t < 0:
        raise InvalidRequestError(f"temperature={t!r} is invalid; expected a finite value >= 0.")
    p = params.top_p
    if not _is_real(p) or not 0 < p <= 1:
        raise InvalidRequestError(f"top_p={p!r} is outside (0, 1].")
    if isinstance(params.stop_token_ids, str) or not _is_sequence(params.stop_token_ids):
        raise InvalidRequestError(
            f"stop_token_ids={params.stop_token_ids!r} is invalid; expected a sequence of ints."
        )
    bad = [s for s in params.stop_token_ids if not _is_int(s)]
    if bad:
        raise InvalidRequestError(f"stop token id {bad[0]!r} is not an integer.")
    stops = stop_ids(params, eos_token_id)
    if len(stops) > MAX_STOP_TOKENS:
        raise InvalidRequestError(
            f"{len(stops)} stop token ids (EOS included) exceed the limit of {MAX_STOP_TOKENS}."
        )
    bad = [s for s in stops if not 0 <= s < vocab_size]
    if bad:
        raise InvalidRequestError(f"stop token id {bad[0]} is outside [0, {vocab_size}).")
    seed = params.seed
    if seed is not None and (not _is_int(seed) or not SEED_MIN <= seed < SEED_END):
        raise InvalidRequestError(
            f"seed={seed!r} is invalid; expected None or an integer in [-2**63, 2**63)."
        )
    needed = len(ids) + params.max_new_tokens - 1  # the last new token is never fed back
    limits = (
        (max_positions, "positions", "the model's max_position_embeddings"),
        (max_seq_len, "cache slots", "max_seq_len"),
    )
    for limit, what, name in limits:
        if limit is not None and needed > limit:
            raise InvalidRequestError(
                f"prompt of {len(ids)} tokens plus max_new_tokens={params.max_new_tokens} needs "
                f"{needed} {what}, more than {name}={limit}."
            )
    return ids


def prompt_token_ids(prompt: object) -> tuple[int, ...]:
    """``prompt`` as a tuple of Python ints; `InvalidRequestError` unless it is one sequence of
    integers (an integer array, or a list / tuple of ints: floats, bools and strings are refused,
    never converted)."""
    if hasattr(prompt, "dtype") and hasattr(prompt, "shape"):  # NumPy / JAX arrays
        array = np.asarray(prompt)
        if array.ndim != 1:
            raise InvalidRequestError(
                f"prompt must be one sequence of integer token ids; got shape {array.shape}."
            )
        if array.dtype.kind not in "iu":
            raise InvalidRequestError(
                f"prompt must hold integer token ids; got dtype {array.dtype}."
            )
        return tuple(array.tolist())
    if isinstance(prompt, str | bytes) or not _is_sequence(prompt):
        raise InvalidRequestError(
            f"prompt must be a sequence of integer token ids; got {type(prompt).__name__}."
        )
    for i, t in enumerate(prompt):
        if not _is_int(t):
            raise InvalidRequestError(
                f"prompt must hold integer token ids; got {t!r} at position {i}."
            )
    return tuple(int(t) for t in prompt)


SEED_MIN, SEED_END = -(2**63), 2**63  # what `jax.random.key` takes
SAMPLE_INDEX_END = 2**32  # `jax.random.fold_in` data is uint32


def wrap_seed(base: int, number: int) -> int:
    """The seed of request ``number`` of a server seeded with ``base`` when the request names
    none: ``base * 1_000_003 + number``, wrapped into JAX's 64-bit seed range."""
    return (base * 1_000_003 + number - SEED_MIN) % (SEED_END - SEED_MIN) + SEED_MIN


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _is_sequence(value: object) -> bool:
    return isinstance(value, Sequence | np.ndarray)


def _check_int(name: str, value: object, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise InvalidRequestError(f"{name}={value!r} is invalid; expected an integer >= {minimum}.")
