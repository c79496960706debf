"""`GenerationServer`: slot-based continuous batching over the pure prefill / decode steps.

A fixed number of decode slots (cache rows) run in chunks of ``decode_chunk`` steps. Between
chunks the scheduler (`step`) applies a pending weight update, handles aborts, refills free slots
from the FIFO queue with one prefill call (samples of one request share a prefill row), and runs
the next chunk; a sequence that finishes frees its slot at the next boundary without waiting for
the rest of the batch.

Weight updates are interruptible generation, as in AReaL: in-flight sequences are kept, and with
``recompute_kv`` (default) their prompt + generated tokens are re-prefilled under the new weights,
so every later token is exactly the new policy's sample; each token records the version of the
weights that produced it. Without ``recompute_kv`` the stale cache is kept (cheaper, approximate).

All device work happens in `step`, run by a background thread (``threaded=True``) or by the
caller (``threaded=False``, deterministic: tests drive it with `step` / `run_until_idle`).
Public methods are thread-safe. Shapes are fixed: one cache of ``max_slots x max_seq_len``, one
decode chunk per sampling mode, prefills in calls of ``prefill_rows`` rows, bucketed to powers
of two in length.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
from concurrent.futures import Future
from typing import Any

import numpy as np

from jaxrlhf.generation.generate import MIN_PROMPT_BUCKET
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
    Completion,
    InvalidRequestError,
    RequestOutput,
    SamplingParams,
    stop_ids,
    validate_request,
    wrap_seed,
)
from jaxrlhf.logging import compile_totals
from jaxrlhf.models.handle import ModelHandle
from jaxrlhf.models.transformer import Params


class RequestHandle:
    """Future of one submitted request; ``result()`` raises the request's error, if any."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._future: Future[RequestOutput] = Future()

    def result(self, timeout: float | None = None) -> RequestOutput:
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._future.exception(timeout)

    def done(self) -> bool:
        return self._future.done()

    def add_done_callback(self, fn) -> None:
        """Call ``fn(handle)`` once the request ends (at once if it already has)."""
        self._future.add_done_callback(lambda _: fn(self))


@dataclasses.dataclass(eq=False)
class _Request:
    request_id: str
    prompt: tuple[int, ...]
    params: SamplingParams
    stops: tuple[int, ...]
    handle: RequestHandle
    min_update: int  # updates published before it was submitted: it never runs under fewer
    sequences: list[_Sequence] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(eq=False)
class _Sequence:
    """Host state of one sample: what it generated so far and where it runs."""

    request: _Request
    index: int
    key_data: np.ndarray
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    sampled_logprobs: list[float] = dataclasses.field(default_factory=list)
    versions: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    slot: int | None = None
    needs_prefill: bool = True

    @property
    def context(self) -> tuple[int, ...]:
        return self.request.prompt + tuple(self.tokens)

    def completion(self) -> Completion:
        return Completion(
            tokens=np.asarray(self.tokens, np.int32),
            logprobs=np.asarray(self.logprobs, np.float32),
            sampled_logprobs=np.asarray(self.sampled_logprobs, np.float32),
            versions=np.asarray(self.versions, np.int32),
            finish_reason=self.finish_reason or "abort",
        )


class GenerationServer:
    """Continuous-batching generation over one model replica (one generation sub-mesh)."""

    def __init__(
        self,
        model: ModelHandle,
        *,
        max_slots: int = 64,
        max_seq_len: int = 2048,
        decode_chunk: int = 16,
        prefill_rows: int = 16,
        version: int = 0,
        eos_token_id: int | tuple[int, ...] | None = None,
        recompute_kv: bool = True,
        threaded: bool = True,
        seed: int = 0,
        name: str = "server",
    ):
        if max_slots < 1 or max_seq_len < 2 or decode_chunk < 1 or prefill_rows < 1:
            raise ValueError(
                f"max_slots={max_slots}, max_seq_len={max_seq_len}, decode_chunk={decode_chunk}, "
                f"prefill_rows={prefill_rows}: expected max_slots >= 1, max_seq_len >= 2, "
                "decode_chunk >= 1 and prefill_rows >= 1."
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} is invalid; expected an integer.")
        self.prefill_rows = min(prefill_rows, max_slots)
        compile_totals()  # start counting compilation (health()["compile_s"])
        self.name = name
        self.config = model.config
        self.max_slots, self.max_seq_len, self.decode_chunk = max_slots, max_seq_len, decode_chunk
        self.eos_token_id = model.config.eos_token_id if eos_token_id is None else eos_token_id
        self.recompute_kv = recompute_kv
        self._sampler = Sampler(model.config, model.params, model.mesh)
        self._version = version  # of the weights decoding now
        # `update_weights` calls made / applied so far. Counted, not compared by version: a
        # caller may publish any version number, the order of calls is what admission obeys.
        self._updates_published = self._updates_applied = 0
        self._cache = self._sampler.new_cache(max_slots, max_seq_len)
        self._rows = empty_rows(max_slots)
        self._slots: list[_Sequence | None] = [None] * max_slots
        self._queue: collections.deque[_Sequence] = collections.deque()
        self._requests: dict[str, _Request] = {}
        self._pending_weights: tuple[Any, int, int] | None = None  # params, version, update
        self._aborts: set[str] = set()
        self._paused = self._closed = self._in_step = False
        self._cond = threading.Condition()
        self._step_lock = threading.Lock()
        self._ids = itertools.count()
        self._seed = seed
        self._stats = collections.Counter()
        self._last_error: str | None = None
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
            self._thread.start()

    @classmethod
    def from_config(cls, model: ModelHandle, gen, **kwargs) -> GenerationServer:
        """Slots and chunk size from a `jaxrlhf.config.GenerationConfig`."""
        return cls(model, max_slots=gen.max_concurrent, decode_chunk=gen.decode_chunk, **kwargs)

    # ----------------------------------------------------------------------- public API

    @property
    def threaded(self) -> bool:
        """Whether a background thread drives `step` (else the caller does)."""
        return self._thread is not None

    @property
    def version(self) -> int:
        """Policy version of the weights decoding now."""
        return self._version

    def submit(
        self,
        prompt_ids: Any,
        params: SamplingParams,
        request_id: str | None = None,
    ) -> RequestHandle:
        """Queue a request. It never raises for a bad request: a closed server or a request
        `validate_request` refuses (bad token ids or sampling params, a prompt too long for the
        model or the cache, a seed out of range, a duplicate or non-string ``request_id``) gets
        a handle that is already done and whose ``result()`` raises the error in one sentence
        (`InvalidRequestError`, a ValueError; RuntimeError when closed)."""
        with self._cond:
            number = next(self._ids)
            request_id = request_id if request_id is not None else f"{self.name}-{number}"
            handle = RequestHandle(request_id)
            try:
                if self._closed:
                    raise RuntimeError(f"generation server {self.name!r} is closed.")
                if not isinstance(request_id, str):
                    raise InvalidRequestError(f"request_id {request_id!r} is not a string.")
                if request_id in self._requests:
                    raise InvalidRequestError(f"request_id {request_id!r} is already in flight.")
                prompt = validate_request(
                    prompt_ids, params, vocab_size=self.config.vocab_size,
                    max_seq_len=self.max_seq_len, eos_token_id=self.eos_token_id,
                    max_positions=self.config.max_position_embeddings,
                )  # fmt: skip
            except (InvalidRequestError, RuntimeError) as e:
                self._stats["rejected"] += 1
                handle._future.set_exception(e)
                return handle
            seed = params.seed if params.seed is not None else wrap_seed(self._seed, number)
            request = _Request(
                request_id, prompt, params, stop_ids(params, self.eos_token_id), handle,
                min_update=self._updates_published,
            )  # fmt: skip
            request.sequences = [
                _Sequence(request, j, sample_key_data(seed, params.sample_offset + j))
                for j in range(params.n)
            ]
            self._requests[request_id] = request
            self._queue.extend(request.sequences)
            self._cond.notify_all()
        return handle

    def generate(
        self, prompts: list[Any], params: SamplingParams, timeout: float | None = None
    ) -> list[RequestOutput]:
        """Submit ``prompts`` and wait for all of them (raises the first request error)."""
        handles = [self.submit(p, params) for p in prompts]
        if self._thread is None:
            self.run_until_idle()
        return [h.result(timeout) for h in handles]

    def update_weights(self, params: Params, version: int, *, wait: bool = False) -> None:
        """Swap in ``params`` (train layout, any placement) between two decode chunks.

        In-flight requests continue under the new weights; tokens carry ``version``. A request
        submitted after this returns never runs under older weights, even when a scheduling
        round that began before the update admits it (async PPO's staleness bound relies on
        it: the trainer publishes, then lets the producers submit at the new version). The
        layout conversion and transfer run in the caller's thread, so decoding is not held up.
        """
        converted = self._sampler.convert(params)
        with self._cond:
            self._updates_published += 1
            self._pending_weights = (converted, version, self._updates_published)
            self._cond.notify_all()
            if wait and self._thread is not None:
                self._cond.wait_for(
                    lambda: self._closed or (self._pending_weights is None and not self._in_step)
                )

    def abort(self, request_id: str) -> bool:
        """Finish a request now with reason "abort" (partial tokens kept); False if unknown."""
        with self._cond:
            request = self._requests.get(request_id)
            if request is None:
                return False
            self._aborts.add(request_id)
            self._cond.notify_all()
        return True

    def pause(self) -> None:
        """Stop decoding after the chunk in flight (returns once it is done); state is kept."""
        with self._cond:
            self._paused = True
            self._cond.wait_for(lambda: not self._in_step)

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def load(self) -> int:
        """Sequences queued or running (the manager's balancing key)."""
        with self._cond:
            return len(self._queue) + sum(s is not None for s in self._slots)

    def health(self) -> dict[str, Any]:
        """Liveness and counters for monitoring."""
        with self._cond:
            alive = not self._closed and (self._thread is None or self._thread.is_alive())
            return {
                "name": self.name,
                "alive": alive,
                "paused": self._paused,
                "version": self._version,
                "running": sum(s is not None for s in self._slots),
                "queued": len(self._queue),
                "completed": self._stats["completed"],
                "rejected": self._stats["rejected"],
                "tokens_generated": self._stats["tokens"],
                "chunks": self._stats["chunks"],
                "compile_s": compile_totals()["seconds"],  # this process's, since start
                "last_error": self._last_error,
            }

    def close(self) -> None:
        """Stop the worker; unfinished requests fail with an error."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            requests, self._requests = list(self._requests.values()), {}
            self._queue.clear()
            self._slots = [None] * self.max_slots
        for request in requests:
            request.handle._future.set_exception(
                RuntimeError(f"generation server {self.name!r} closed before the request ended.")
            )

    def __enter__(self) -> GenerationServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------- scheduling

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        """Drive `step` until there is nothing to do (``threaded=False`` servers)."""
        for _ in range(max_steps):
            if not self.step():
                return

    def step(self) -> bool:
        """One scheduling round: weights, aborts, admission, one decode chunk. False if idle."""
        with self._step_lock:
            with self._cond:
                if self._closed:
                    return False
                self._in_step = True
                weights, self._pending_weights = self._pending_weights, None
                aborts, self._aborts = self._aborts, set()
                paused = self._paused
            done: list[_Request] = []
            try:
                worked = self._step(weights, aborts, paused, done)
            except Exception as e:  # a device failure must not kill the server
                self._fail_running(e, done)
                worked = True
            finally:
                with self._cond:
                    self._in_step = False
                    for request in done:
                        self._requests.pop(request.request_id, None)
                    self._cond.notify_all()
            for request in done:
                self._resolve(request)
            return worked

    def _step(self, weights, aborts: set[str], paused: bool, done: list[_Request]) -> bool:
        worked = weights is not None or bool(aborts)
        if weights is not None:
            self._sampler.params, self._version, self._updates_applied = weights
            if self.recompute_kv:
                for seq in self._slots:
                    if seq is not None:
                        seq.needs_prefill = True
        for request_id in aborts:
            self._abort(request_id, done)
        if paused:
            return worked
        self._admit()
        if not self._rows.active.any():
            return worked
        self._decode(done)
        return True

    def _abort(self, request_id: str, done: list[_Request]) -> None:
        with self._cond:
            request = self._requests.get(request_id)
            if request is None:
                return
            for seq in request.sequences:
                if seq in self._queue:
                    self._queue.remove(seq)
        for seq in request.sequences:
            if seq.finish_reason is None:
                self._finish(seq, "abort", done)

    def _admit(self) -> None:
        """Fill free slots from the queue and re-prefill sequences whose cache is stale."""
        with self._cond:
            for b, seq in enumerate(self._slots):
                # A request submitted after an update this round has not applied waits for the
                # next round (FIFO: those behind it were submitted later still).
                if seq is None and self._queue and self._admissible(self._queue[0]):
                    seq = self._queue.popleft()
                    seq.slot, self._slots[b] = b, seq
        todo = [s for s in self._slots if s is not None and s.needs_prefill]
        if not todo:
            return
        contexts: dict[Any, int] = {}
        src = np.full(self.max_slots, -1, np.int32)
        for seq in todo:
            # Samples of one request with nothing generated yet share a prefill row.
            group = seq.request if not seq.tokens else seq
            src[seq.slot] = contexts.setdefault(group, len(contexts))
        context = [k.prompt if isinstance(k, _Request) else k.context for k in contexts]
        # Fixed-size calls of `prefill_rows` rows, shortest contexts first: each call's length
        # is bucketed, so prefill compiles once per length bucket (not per rows x length pair,
        # which re-prefills of in-flight sequences after weight updates kept meeting anew).
        order = np.argsort([len(c) for c in context], kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        row_of = np.where(src >= 0, rank[np.maximum(src, 0)], -1)
        n = self.prefill_rows
        for first in range(0, len(order), n):
            chunk = [context[i] for i in order[first : first + n]]
            t = bucket(max(len(c) for c in chunk) - 1, MIN_PROMPT_BUCKET, self.max_seq_len)
            ids, lengths = left_aligned(chunk, n, t)
            chunk_src = np.where((row_of >= first) & (row_of < first + n), row_of - first, -1)
            self._cache = self._sampler.prefill(self._cache, ids, lengths, chunk_src)
        for seq in todo:
            request = seq.request
            set_row(
                self._rows, seq.slot, seq.context, len(seq.tokens), request.params,
                request.stops, seq.key_data,
            )  # fmt: skip
            seq.needs_prefill = False

    def _admissible(self, seq: _Sequence) -> bool:
        return seq.request.min_update <= self._updates_applied

    def _decode(self, done: list[_Request]) -> None:
        rows = self._rows
        active = rows.active
        mode = sampling_mode(rows.temperature[active], rows.top_k[active], rows.top_p[active])
        self._cache, final, out = self._sampler.decode(self._cache, rows, self.decode_chunk, mode)
        final = type(rows)(*(np.array(x) for x in final))
        tokens, logprobs, sampled = (np.asarray(x) for x in out)
        counts = final.num_generated - rows.num_generated
        self._stats["chunks"] += 1
        self._stats["tokens"] += int(counts.sum())
        for b, seq in enumerate(self._slots):
            if seq is None or not rows.active[b]:
                continue
            k = int(counts[b])
            seq.tokens.extend(tokens[b, :k].tolist())
            seq.logprobs.extend(logprobs[b, :k].tolist())
            seq.sampled_logprobs.extend(sampled[b, :k].tolist())
            seq.versions.extend([self._version] * k)
            if not final.active[b]:
                reason = "stop" if seq.tokens[-1] in seq.request.stops else "length"
                self._finish(seq, reason, done)
        self._rows = final._replace(active=final.active & rows.active)

    def _finish(self, seq: _Sequence, reason: str, done: list[_Request]) -> None:
        seq.finish_reason = reason
        if seq.slot is not None:
            self._slots[seq.slot] = None
            self._rows.active[seq.slot] = False
            seq.slot = None
        request = seq.request
        if all(s.finish_reason is not None for s in request.sequences) and request not in done:
            done.append(request)

    def _fail_running(self, error: Exception, done: list[_Request]) -> None:
        """Fail the requests on the device and start from a fresh cache; the queue survives."""
        self._last_error = f"{type(error).__name__}: {error}"
        self._stats["errors"] += 1
        failed = {seq.request for seq in self._slots if seq is not None}
        done[:] = [r for r in done if r not in failed]
        for request in failed:
            for seq in request.sequences:
                if seq.finish_reason is None:
                    seq.finish_reason = "abort"
            with self._cond:
                for seq in request.sequences:
                    if seq in self._queue:
                        self._queue.remove(seq)
            request.handle._future.set_exception(
                RuntimeError(f"generation failed on server {self.name!r}: {self._last_error}")
            )
            with self._cond:
                self._requests.pop(request.request_id, None)
        self._slots = [None] * self.max_slots
        self._rows = empty_rows(self.max_slots)
        self._cache = self._sampler.new_cache(self.max_slots, self.max_seq_len)

    def _resolve(self, request: _Request) -> None:
        self._stats["completed"] += 1
        request.handle._future.set_result(
            RequestOutput(
                request_id=request.request_id,
                prompt_ids=request.prompt,
                completions=tuple(s.completion() for s in request.sequences),
            )
        )

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._has_work())
                if self._closed:
                    return
            self.step()

    def _has_work(self) -> bool:
        if self._pending_weights is not None or self._aborts:
            return True
        running = any(s is not None for s in self._slots)
        return not self._paused and (bool(self._queue) or running)
