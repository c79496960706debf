"""Score many (response, answer) pairs in worker processes, each item under a deadline.

A worker whose item outlives ``timeout`` is killed and replaced; that item scores 0.0 and every
other item keeps its result, in input order. An item whose function raises, returns a non-number,
or kills its worker also scores 0.0, with a warning. Workers are fresh interpreters (see
:mod:`jaxrlhf.rewards.worker`), so this is safe to call from a process that has started JAX.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from typing import Any

from jaxrlhf.rewards.base import get_reward_fn
from jaxrlhf.rewards.worker import Worker, WorkerError

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0


def _check_lengths(
    responses: Sequence[str],
    answers: Sequence[str],
    prompts: Sequence[str | None] | None,
    metadata: Sequence[dict[str, Any] | None] | None,
) -> None:
    for name, seq in (("answers", answers), ("prompts", prompts), ("metadata", metadata)):
        if seq is not None and len(seq) != len(responses):
            raise ValueError(
                f"score_batch got {len(responses)} responses but {len(seq)} {name}; expected "
                f"one per response."
            )


def _item_kwargs(
    i: int,
    prompts: Sequence[str | None] | None,
    metadata: Sequence[dict[str, Any] | None] | None,
) -> dict[str, Any]:
    return {
        "prompt": prompts[i] if prompts is not None else None,
        "metadata": metadata[i] if metadata is not None else None,
    }


def _to_score(value: Any, index: int) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        log.warning("reward item %d returned %s, not a float; scored 0.0", index, type(value))
        return 0.0


class RewardPool:
    """Worker processes that score items with one reward function; reuse it across steps.

    Args:
      fn: a registered reward name, a ``"package.module:function"`` path, or an importable
        module-level callable (see :func:`jaxrlhf.rewards.get_reward_fn`).
      num_workers: number of worker processes (at least 1).
      timeout: default per-item deadline in seconds.
    """

    def __init__(
        self, fn: str | Callable[..., Any], num_workers: int, *, timeout: float = 10.0
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"RewardPool needs num_workers >= 1, got {num_workers}.")
        self._spec = getattr(get_reward_fn(fn), "reward_spec", fn)  # validates here, fails fast
        self.timeout = timeout
        self._workers: list[Worker] = []
        try:
            self._workers = [self._start() for _ in range(num_workers)]
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            for worker in self._workers:
                worker.wait_ready(max(0.0, deadline - time.monotonic()))
        except BaseException:
            self.close()
            raise

    def _start(self) -> Worker:
        return Worker(self._spec, as_reward=True, inline_symbolic=True)

    def score(
        self,
        responses: Sequence[str],
        answers: Sequence[str],
        *,
        prompts: Sequence[str | None] | None = None,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        timeout: float | None = None,
    ) -> list[float]:
        """One float per response, in order; items past ``timeout`` seconds score 0.0."""
        _check_lengths(responses, answers, prompts, metadata)
        timeout = self.timeout if timeout is None else timeout
        scores = [0.0] * len(responses)
        pending = deque(range(len(responses)))
        idle = [w for w in self._workers if w.ready]
        busy: dict[Any, Worker] = {}  # connection -> worker with one item in flight
        # connection -> replacement worker not yet ready (one may be left from the last call)
        starting: dict[Any, Worker] = {w.conn: w for w in self._workers if not w.ready}
        start_deadline = time.monotonic() + STARTUP_TIMEOUT_S if starting else float("inf")

        def replace(worker: Worker) -> None:
            nonlocal start_deadline
            self._workers.remove(worker)
            new = self._start()
            self._workers.append(new)
            starting[new.conn] = new
            start_deadline = min(start_deadline, time.monotonic() + STARTUP_TIMEOUT_S)

        while pending or busy:
            while pending and idle:
                worker, i = idle.pop(), pending.popleft()
                args = (responses[i], answers[i])
                try:
                    worker.submit(i, args, _item_kwargs(i, prompts, metadata), timeout)
                except OSError:  # it died while idle; the item was never sent
                    pending.appendleft(i)
                    worker.kill()
                    replace(worker)
                    continue
                busy[worker.conn] = worker
            if not busy and not starting:  # every worker is gone: cannot happen, but never spin
                raise WorkerError("no reward workers are left.")
            next_deadline = min([w.deadline for w in busy.values()] + [start_deadline])
            ready = wait([*busy, *starting], timeout=max(0.0, next_deadline - time.monotonic()))
            for conn in ready:
                if conn in starting:
                    worker = starting.pop(conn)
                    worker.handle_ready_message()
                    idle.append(worker)
                    continue
                worker = busy.pop(conn)
                try:
                    status, index, value = worker.receive()
                except WorkerError as e:
                    log.warning("%s Scored 0.0; starting a new worker.", e)
                    replace(worker)
                    continue
                if status == "ok":
                    scores[index] = _to_score(value, index)
                else:
                    log.warning("reward item %d failed (%s); scored 0.0", index, value)
                idle.append(worker)
            now = time.monotonic()
            for conn, worker in list(busy.items()):
                if now >= worker.deadline:
                    log.warning(
                        "reward item %d exceeded %g s; scored 0.0 and its worker was killed",
                        worker.busy_index,
                        timeout,
                    )
                    del busy[conn]
                    worker.kill()
                    replace(worker)
            if starting and now >= start_deadline:
                raise WorkerError(f"a reward worker did not start within {STARTUP_TIMEOUT_S} s.")
            if not starting:
                start_deadline = float("inf")
        return scores

    def close(self) -> None:
        """Stop every worker."""
        for worker in self._workers:
            worker.close()
        self._workers = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def score_batch(
    fn: str | Callable[..., Any],
    responses: Sequence[str],
    answers: Sequence[str],
    *,
    prompts: Sequence[str | None] | None = None,
    metadata: Sequence[dict[str, Any] | None] | None = None,
    num_workers: int = 0,
    timeout: float = 10.0,
) -> list[float]:
    """Score every ``(response, answer)`` pair with ``fn``; one float per response, in order.

    ``num_workers > 0`` uses a temporary :class:`RewardPool` (keep a pool instead when scoring
    every step). ``num_workers=0`` scores in this process: exceptions still score 0.0, math
    rewards still bound their symbolic check by their own timeout, but nothing can stop a custom
    function that hangs.
    """
    _check_lengths(responses, answers, prompts, metadata)
    if num_workers > 0:
        with RewardPool(fn, num_workers, timeout=timeout) as pool:
            return pool.score(responses, answers, prompts=prompts, metadata=metadata)
    reward = get_reward_fn(fn)
    scores = []
    for i, (response, answer) in enumerate(zip(responses, answers, strict=True)):
        try:
            scores.append(reward(response, answer, **_item_kwargs(i, prompts, metadata)))
        except Exception as e:
            log.warning("reward item %d failed (%s: %s); scored 0.0", i, type(e).__name__, e)
            scores.append(0.0)
    return scores
