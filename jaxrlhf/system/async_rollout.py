"""Rollout producer of asynchronous PPO: prompts -> generation server -> trajectory buffer.

The producer thread reserves a slot in the buffer (which applies the capacity rule), submits one
prompt group to a generation server (`GenerationServer` or its process-backed twin) and returns
at once; the server's completion callback turns the group into `Trajectories` and puts it in the
buffer. So generation runs continuously and never waits for the trainer, except when η says so.

Groups are numbered in data order: group id ``g`` is row ``g % B`` of prompt batch ``g // B``
(0-based over the run). Seeds follow the sync path: group ``i`` of prompt batch ``k`` draws the
keys sync step ``k + 1`` would, so η = 0 reproduces the synchronous run. A resumed producer
starts at the first group not yet trained on and skips the later ones that were (``skip``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from jaxrlhf.config import GenerationConfig
from jaxrlhf.data.pipeline import PromptBatch
from jaxrlhf.generation.types import RequestOutput, SamplingParams
from jaxrlhf.system.rollout import Trajectories
from jaxrlhf.system.trajectory_queue import BufferClosed, TrajectoryBuffer


def group_trajectories(
    prompt: np.ndarray,
    output: RequestOutput,
    prompt_text: str,
    answer: str,
    tokenizer: Any,
    metadata: dict[str, Any] | None = None,
) -> Trajectories:
    """One finished request (``n`` completions of ``prompt``) as token-aligned `Trajectories`;
    ``metadata`` is the dataset row's other fields."""
    p = len(prompt)
    ids, mask, logp, versions, texts = [], [], [], [], []
    for c in output.completions:
        ids.append(np.concatenate([prompt, c.tokens]).astype(np.int32))
        mask.append(np.concatenate([np.zeros(p), np.ones(len(c.tokens))]).astype(np.float32))
        logp.append(np.concatenate([np.zeros(p), c.logprobs]).astype(np.float32))
        versions.append(np.concatenate([np.full(p, -1), c.versions]).astype(np.int32))
        texts.append(tokenizer.decode(c.tokens, skip_special_tokens=True))
    n = len(output.completions)
    return Trajectories(
        input_ids=ids,
        response_mask=mask,
        behav_logprobs=logp,
        versions=versions,
        prompt_lens=np.full(n, p, np.int32),
        response_lens=np.asarray([len(c.tokens) for c in output.completions], np.int32),
        truncated=np.asarray([c.finish_reason == "length" for c in output.completions]),
        prompts=[prompt_text] * n,
        responses=texts,
        answers=[answer] * n,
        metadata=[metadata] * n,
        group_size=n,
    )


def concat_trajectories(groups: list[Trajectories]) -> Trajectories:
    """Groups -> one batch (groups stay consecutive, in the given order)."""
    cat = lambda name: [x for g in groups for x in getattr(g, name)]
    return Trajectories(
        input_ids=cat("input_ids"),
        response_mask=cat("response_mask"),
        behav_logprobs=cat("behav_logprobs"),
        versions=cat("versions"),
        prompt_lens=np.concatenate([g.prompt_lens for g in groups]),
        response_lens=np.concatenate([g.response_lens for g in groups]),
        truncated=np.concatenate([g.truncated for g in groups]),
        prompts=cat("prompts"),
        responses=cat("responses"),
        answers=cat("answers"),
        metadata=cat("metadata"),
        group_size=groups[0].group_size,
    )


def min_token_version(traj: Trajectories) -> int:
    """Version of the oldest response token of a group (its staleness is measured from it)."""
    return int(min(v[m > 0].min(initial=np.iinfo(np.int32).max)
                   for v, m in zip(traj.versions, traj.response_mask, strict=True)))  # fmt: skip


class RolloutProducer:
    """A thread that keeps the generation server as busy as the capacity rule allows."""

    def __init__(
        self,
        server: Any,
        buffer: TrajectoryBuffer,
        next_batch: Callable[[], PromptBatch],
        tokenizer: Any,
        gen: GenerationConfig,
        *,
        seed: int,
        batch_size: int,
        first_gid: int = 0,
        skip: Iterable[int] = (),
    ) -> None:
        self.server, self.buffer, self.tokenizer = server, buffer, tokenizer
        self._next_batch = next_batch
        self._params = SamplingParams.from_config(gen)
        self._seed, self._batch_size = seed, batch_size
        self._next_gid, self._skip = first_gid, set(skip)
        self._batch_index = first_gid // batch_size - 1  # which prompt batch `_batch` is
        self._batch: PromptBatch | None = None
        self.gid_of: dict[int, int] = {}  # buffer uid -> group id, until the trainer takes it
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._idle_since: float | None = time.perf_counter()
        self.idle_s = 0.0  # wall time with nothing submitted to the server
        self.tokens = 0  # response tokens received
        self.samples = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="rollout-producer", daemon=True)

    def start(self) -> RolloutProducer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def counters(self) -> dict[str, float]:
        """Cumulative idle seconds, response tokens and samples (the caller takes deltas)."""
        with self._lock:
            idle = self.idle_s
            if self._idle_since is not None:
                idle += time.perf_counter() - self._idle_since
            return {"idle_s": idle, "tokens": self.tokens, "samples": self.samples}

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                reserved = self.buffer.reserve(timeout=0.05)
                if reserved is not None:
                    self._submit(*reserved)
        except BufferClosed:
            pass
        except BaseException as e:  # surfaced to the trainer, which closes the buffer
            self.error = e
            self.buffer.close()

    def _submit(self, uid: int, submit_version: int) -> None:
        gid = self._next_gid
        while gid in self._skip:  # trained on before a resume
            self._skip.discard(gid)
            gid += 1
        self._next_gid = gid + 1
        k, i = divmod(gid, self._batch_size)
        while self._batch_index < k:  # a batch whose groups were all trained on is read too
            self._batch = self._next_batch()
            self._batch_index += 1
        with self._lock:
            self.gid_of[uid] = gid
        batch = self._batch
        assert batch is not None
        prompt = batch.input_ids_bt[i][batch.attention_mask_bt[i].astype(bool)].astype(np.int32)
        n = self._params.n
        params = SamplingParams(
            **{**self._params.__dict__,
               "seed": self._seed * 1_000_003 + k + 1, "sample_offset": i * n}
        )  # fmt: skip
        with self._lock:
            if self._in_flight == 0 and self._idle_since is not None:
                self.idle_s += time.perf_counter() - self._idle_since
                self._idle_since = None
            self._in_flight += 1
        handle = self.server.submit(prompt, params, request_id=f"group-{uid}")
        row = (batch.prompts[i], batch.answers[i], batch.row_metadata(i))
        handle.add_done_callback(lambda h: self._done(h, uid, prompt, row))

    def _done(
        self, handle: Any, uid: int, prompt: np.ndarray, row: tuple[str, str, dict | None]
    ) -> None:
        text, answer, metadata = row
        try:
            traj = group_trajectories(
                prompt, handle.result(), text, answer, self.tokenizer, metadata
            )
            with self._lock:
                self.tokens += int(traj.response_lens.sum())
                self.samples += len(traj)
            self.buffer.put(uid, traj, min_token_version(traj))
        except BufferClosed:
            pass
        except BaseException as e:
            self.error = e
            self.buffer.close()
        finally:
            with self._lock:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle_since = time.perf_counter()
