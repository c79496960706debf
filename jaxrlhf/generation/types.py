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
) -> tuple[int, ...]:
    """Check a request; return its prompt as a tuple of ints or raise `InvalidRequestError`."""
    try:
        ids = tuple(int(t) for t in prompt)
    except (TypeError, ValueError):
        raise InvalidRequestError("prompt must be a sequence of integer token ids.") from None
    if not ids:
        raise InvalidRequestError("prompt is empty; at least one token is required.")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"prompt token id {bad[0]} is outside [0, {vocab_size}).")
    _check_int("max_new_tokens", params.max_new_tokens, 1)
    _check_int("min_new_tokens", params.min_new_tokens, 0)
    _check_int("top_k", params.top_k, 0)
    _check_int("n", params.n, 1)
    t = params.temperature
    if not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
        raise InvalidRequestError(f"temperature={t!r} is invalid; expected a finite value >= 0.")
    p = params.top_p
    if not isinstance(p, int | float) or not 0 < p <= 1:
        raise InvalidRequestError(f"top_p={p!r} is outside (0, 1].")
    stops = stop_ids(params, eos_token_id)
    if len(stops) > MAX_STOP_TOKENS:
        raise InvalidRequestError(
            f"{len(stops)} stop token ids (EOS included) exceed the limit of {MAX_STOP_TOKENS}."
        )
    bad = [s for s in stops if not 0 <= s < vocab_size]
    if bad:
        raise InvalidRequestError(f"stop token id {bad[0]} is outside [0, {vocab_size}).")
    if params.seed is not None and not isinstance(params.seed, int):
        raise InvalidRequestError(f"seed={params.seed!r} is invalid; expected an int or None.")
    needed = len(ids) + params.max_new_tokens - 1
    if max_seq_len is not None and needed > max_seq_len:
        raise InvalidRequestError(
            f"prompt of {len(ids)} tokens plus max_new_tokens={params.max_new_tokens} needs "
            f"{needed} cache slots, more than max_seq_len={max_seq_len}."
        )
    return ids


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise InvalidRequestError(f"{name}={value!r} is invalid; expected an integer >= {minimum}.")
