"""`generate`: batch generation for a padded batch of prompts (one prefill, one decode chunk)."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxrlhf.generation.sampler import (
    Sampler,
    bucket,
    empty_rows,
    left_aligned,
    sample_key_data,
    sampling_mode,
    set_row,
)
from jaxrlhf.generation.types import (
    InvalidRequestError,
    SamplingParams,
    stop_ids,
    validate_request,
)
from jaxrlhf.hostio import fetch
from jaxrlhf.models.handle import ModelHandle

MIN_PROMPT_BUCKET = 16
MIN_NEW_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """Result of `generate`; row ``r`` is sample ``r % n`` of prompt ``r // n``.

    All arrays have ``R = batch * n`` rows and ``max_new_tokens`` columns; entries past a row's
    length hold ``pad_token_id`` / 0.0 / -1.
    """

    tokens: np.ndarray  # int32 [R, max_new_tokens]; the stop token, if any, is included
    logprobs: np.ndarray  # float32: full softmax at the temperature; the behaviour log-prob
    sampled_logprobs: np.ndarray  # float32: the truncated (top-k / top-p) distribution sampled
    lengths: np.ndarray  # int32 [R]
    finish_reasons: tuple[str, ...]  # "stop" | "length"
    versions: np.ndarray  # int32 [R, max_new_tokens]: policy version of each token
    num_samples: int  # n


_SAMPLERS: dict[int, tuple[Any, Any, Sampler]] = {}


def sampler_for(model: ModelHandle) -> Sampler:
    """The decode-layout `Sampler` of ``model``, converted once per params object."""
    entry = _SAMPLERS.get(id(model))
    if entry is not None and entry[0]() is model and entry[1] is model.params:
        return entry[2]
    sampler = Sampler(model.config, model.params, model.mesh)
    _SAMPLERS[id(model)] = (weakref.ref(model), model.params, sampler)
    weakref.finalize(model, _SAMPLERS.pop, id(model), None)
    return sampler


def generate(
    model: ModelHandle | Sampler,
    input_ids: Any,
    attention_mask: Any | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    stop_token_ids: Sequence[int] = (),
    min_new_tokens: int = 0,
    n: int = 1,
    pad_token_id: int = 0,
    version: int = 0,
) -> GenerationOutput:
    """Generate ``n`` completions for each row of a padded prompt batch.

    ``attention_mask`` is 1 at real tokens (left or right padding); each row's real tokens are
    its prompt. Sample ``j`` of prompt ``i`` draws from key ``fold_in(key(seed), i * n + j)``.
    Stops at ``eos_token_id`` / ``stop_token_ids`` (included in the output) or after
    ``max_new_tokens``. Bad input (float or out-of-vocabulary ids, a prompt plus
    ``max_new_tokens`` beyond the model's ``max_position_embeddings``, bad sampling settings or
    ``seed``) raises `InvalidRequestError` (a ValueError) naming the row and the value.
    """
    sampler = model if isinstance(model, Sampler) else sampler_for(model)
    cfg = sampler.config
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise InvalidRequestError(f"input_ids must be [batch, seq]; got shape {ids.shape}.")
    if ids.dtype.kind not in "iu":  # floats are refused, never truncated
        raise InvalidRequestError(f"input_ids must hold integer token ids; got dtype {ids.dtype}.")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise InvalidRequestError(
            f"attention_mask shape {mask.shape} does not match input_ids {ids.shape}."
        )
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        min_new_tokens=min_new_tokens, stop_token_ids=tuple(stop_token_ids), n=n, seed=seed,
    )  # fmt: skip
    prompts = []
    for i, (row, row_mask) in enumerate(zip(ids, mask, strict=True)):
        try:
            prompts.append(
                validate_request(
                    row[row_mask.astype(bool)],
                    params,
                    vocab_size=cfg.vocab_size,
                    max_seq_len=None,
                    eos_token_id=eos_token_id,
                    max_positions=cfg.max_position_embeddings,
                )
            )
        except InvalidRequestError as e:
            raise InvalidRequestError(f"row {i}: {e}") from None
    stops = stop_ids(params, eos_token_id)
    num_rows = len(prompts) * n
    batch = bucket(num_rows)
    t = bucket(max(len(p) for p in prompts) - 1, MIN_PROMPT_BUCKET)
    steps = bucket(max_new_tokens, MIN_NEW_BUCKET)
    rows = empty_rows(batch)
    for r in range(num_rows):
        set_row(rows, r, prompts[r // n], 0, params, stops, sample_key_data(seed, r))
    prefill_ids, lengths = left_aligned(prompts, bucket(len(prompts)), t)
    src = np.where(np.arange(batch) < num_rows, np.arange(batch) // n, -1)

    cache = sampler.new_cache(batch, t + steps)
    cache = sampler.prefill(cache, prefill_ids, lengths, src)
    mode = sampling_mode(rows.temperature[:num_rows], rows.top_k[:num_rows], rows.top_p[:num_rows])
    _, final, out = sampler.decode(cache, rows, steps, mode)
    num_generated, out = fetch((final.num_generated, out))  # gathers across processes

    lengths = np.asarray(num_generated)[:num_rows]
    valid = np.arange(max_new_tokens)[None, :] < lengths[:, None]
    tokens = np.where(valid, np.asarray(out.tokens)[:num_rows, :max_new_tokens], pad_token_id)
    last = tokens[np.arange(num_rows), np.maximum(lengths - 1, 0)]
    reasons = tuple("stop" if tok in stops else "length" for tok in last.tolist())
    return GenerationOutput(
        tokens=tokens.astype(np.int32),
        logprobs=np.where(valid, np.asarray(out.logprobs)[:num_rows, :max_new_tokens], 0.0),
        sampled_logprobs=np.where(
            valid, np.asarray(out.sampled_logprobs)[:num_rows, :max_new_tokens], 0.0
        ),
        lengths=lengths.astype(np.int32),
        finish_reasons=reasons,
        versions=np.where(valid, version, -1).astype(np.int32),
        num_samples=n,
    )
