"""Rollout: prompts -> n sampled responses per prompt -> `Trajectories` (scored by
`jaxrlhf.system.scoring`).

Trajectories are per-sample host arrays in the *token-aligned* layout the train steps use: entry
t of a per-token field belongs to token t of ``prompt + response`` (its log-prob is computed from
position t - 1). Prompt tokens carry ``response_mask`` 0, so they never enter a loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxrlhf.config import GenerationConfig
from jaxrlhf.data.pipeline import PromptBatch
from jaxrlhf.generation import generate
from jaxrlhf.generation.sampler import Sampler


@dataclasses.dataclass
class Trajectories:
    """One row per sample; samples of one prompt are consecutive (``group_size`` of them)."""

    input_ids: list[np.ndarray]  # int32 [P + R]: prompt then response
    response_mask: list[np.ndarray]  # float32 [P + R]: 1 at response tokens
    behav_logprobs: list[np.ndarray]  # float32 [P + R]: behaviour log-prob, 0 at prompt tokens
    versions: list[np.ndarray]  # int32 [P + R]: policy version per token, -1 at prompt tokens
    prompt_lens: np.ndarray  # int32 [N]
    response_lens: np.ndarray  # int32 [N]
    truncated: np.ndarray  # bool [N]: stopped by max_new_tokens, not by EOS / a stop token
    prompts: list[str]
    responses: list[str]
    answers: list[str]
    metadata: list[dict[str, Any] | None]  # the dataset row's other fields (reward functions)
    group_size: int
    scores: np.ndarray | None = None  # float32 [N], filled by `Scorer.score`

    def __len__(self) -> int:
        return len(self.input_ids)

    def response_field(self, values: Sequence[np.ndarray], width: int) -> np.ndarray:
        """Token-aligned per-sample arrays -> response-aligned ``[N, width]`` (0-padded)."""
        return response_aligned(values, self.response_mask, width)

    def token_field(self, values_nr: np.ndarray) -> list[np.ndarray]:
        """Response-aligned ``[N, width]`` -> token-aligned per-sample arrays (0 at prompts)."""
        return token_aligned(values_nr, self.response_mask)


def response_aligned(
    values: Sequence[np.ndarray], response_mask: Sequence[np.ndarray], width: int
) -> np.ndarray:
    """Token-aligned per-sample arrays -> ``[N, width]``: row i holds sample i's values at its
    response tokens (``response_mask`` > 0), in order, then zeros."""
    out = np.zeros((len(values), width), np.float32)
    for i, (v, m) in enumerate(zip(values, response_mask, strict=True)):
        picked = np.asarray(v)[np.asarray(m) > 0]
        out[i, : len(picked)] = picked
    return out


def token_aligned(values_nr: np.ndarray, response_mask: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The inverse of `response_aligned`: per-sample arrays shaped like ``response_mask``, 0
    outside the response tokens."""
    out = []
    for i, m in enumerate(response_mask):
        resp = np.asarray(m) > 0
        row = np.zeros(len(m), np.float32)
        row[resp] = values_nr[i, : int(resp.sum())]
        out.append(row)
    return out


def generate_trajectories(
    sampler: Sampler,
    batch: PromptBatch,
    tokenizer: Any,
    gen: GenerationConfig,
    *,
    seed: int,
    version: int,
    greedy: bool = False,
) -> Trajectories:
    """Sample ``gen.n_samples`` responses per prompt (one greedy response when ``greedy``)."""
    n = 1 if greedy else gen.n_samples
    out = generate(
        sampler,
        batch.input_ids_bt,
        batch.attention_mask_bt,
        max_new_tokens=gen.max_new_tokens,
        temperature=0.0 if greedy else gen.temperature,
        top_p=1.0 if greedy else gen.top_p,
        top_k=0 if greedy else (gen.top_k or 0),
        min_new_tokens=gen.min_new_tokens,
        seed=seed,
        eos_token_id=tokenizer.eos_token_id,
        stop_token_ids=gen.stop_token_ids,
        n=n,
        pad_token_id=tokenizer.pad_token_id or 0,
        version=version,
    )
    prompt_rows = [
        row[m.astype(bool)]
        for row, m in zip(batch.input_ids_bt, batch.attention_mask_bt, strict=True)
    ]
    ids, mask, logp, versions, texts = [], [], [], [], []
    for r, length in enumerate(out.lengths.tolist()):
        prompt = prompt_rows[r // n]
        p = len(prompt)
        ids.append(np.concatenate([prompt, out.tokens[r, :length]]).astype(np.int32))
        mask.append(np.concatenate([np.zeros(p), np.ones(length)]).astype(np.float32))
        logp.append(np.concatenate([np.zeros(p), out.logprobs[r, :length]]).astype(np.float32))
        versions.append(np.concatenate([np.full(p, -1), out.versions[r, :length]]).astype(np.int32))
        texts.append(tokenizer.decode(out.tokens[r, :length], skip_special_tokens=True))
    return Trajectories(
        input_ids=ids,
        response_mask=mask,
        behav_logprobs=logp,
        versions=versions,
        prompt_lens=np.asarray([len(prompt_rows[r // n]) for r in range(len(ids))], np.int32),
        response_lens=out.lengths.astype(np.int32),
        truncated=np.asarray([reason == "length" for reason in out.finish_reasons]),
        prompts=[batch.prompts[r // n] for r in range(len(ids))],
        responses=texts,
        answers=[batch.answers[r // n] for r in range(len(ids))],
        metadata=[batch.row_metadata(r // n) for r in range(len(ids))],
        group_size=n,
    )
