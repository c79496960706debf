"""Score many (response, answer) pairs in worker processes, each item under a deadline.

A worker whose item outlives ``timeout`` is killed and replaced; that item scores 0.0 and every
other item keeps its result, in input order. An item whose function raises, returns a non-number,
or kills its worker also scores 0.0. `ScoreReport` counts both kinds of failure and keeps the
first message; `RewardPool.score` and `score_batch` log one warning per call that had failures.
Workers are fresh interpreters (see :mod:`jaxrlhf.rewards.worker`), so this is safe to call from
a process that has started JAX.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from typing import Any

from jaxrlhf.rewards.base import RewardFn, get_reward_fn
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


@dataclasses.dataclass
class ScoreReport:
    """Scores in input order, and the items that scored 0.0 because they failed."""

    scores: list[float]
    errors: int = 0  # raised, returned a non-number, or killed its worker
    timeouts: int = 0  # outlived their deadline
    first_failure: str | None = None  # of the failed item first in input order: "item 3: ..."
    first_index: int | None = None

    def fail(self, index: int, message: str, *, timeout: bool = False) -> None:
        """Item ``index`` scores 0.0; count it and keep the first message in input order."""
        self.scores[index] = 0.0
        if timeout:
            self.timeouts += 1
        else:
            self.errors += 1
        if self.first_index is None or index < self.first_index:
            self.first_index, self.first_failure = index, f"item {index}: {message}"
        log.debug("reward item %d scored 0.0: %s", index, message)

    def warn(self) -> None:
        """One warning if any item failed."""
        if self.errors or self.timeouts:
            log.warning(
                "%d reward items failed and %d timed out (scored 0.0); the first: %s",
                self.errors, self.timeouts, self.first_failure,
            )  # fmt: skip


def score_in_process(
    reward: RewardFn,
    responses: Sequence[str],
    answers: Sequence[str],
    *,
    prompts: Sequence[str | None] | None = None,
    metadata: Sequence[dict[str, Any] | None] | None = None,
    timeout: float = float("inf"),
) -> ScoreReport:
    """Score every item with ``reward`` (from `get_reward_fn`) in this process, each under a
    ``timeout``-second deadline.

    The items run one after another in a helper thread that the caller's thread watches. An item
    still running at its deadline scores 0.0, counts as a timeout and is abandoned: Python cannot
    stop a thread, so it runs on in the background (a daemon thread) while the rest of the batch
    goes on in a fresh one. Use `RewardPool` for rewards that may hang: it kills them.
    """
    _check_lengths(responses, answers, prompts, metadata)
    report = ScoreReport([0.0] * len(responses))

    def call(i: int) -> Any:
        return reward(responses[i], answers[i], **_item_kwargs(i, prompts, metadata))

    first = 0
    while first < len(responses):
        runner = _ItemRunner(call, first, len(responses))
        runner.start()
        hung = runner.watch(timeout)
        for i, (ok, value, elapsed) in sorted(runner.results.items()):
            if not ok:
                report.fail(i, value)
            elif elapsed > timeout:
                report.fail(i, f"took {elapsed:.1f} s, past the {timeout:g} s deadline",
                            timeout=True)  # fmt: skip
            else:
                report.scores[i] = value
        if hung is None:
            break
        report.fail(hung, f"still running at the {timeout:g} s deadline; abandoned", timeout=True)
        first = hung + 1
    return report


class _ItemRunner(threading.Thread):
    """Items ``first .. n-1`` of a batch, in order, in a daemon thread; `watch` waits for them
    and gives up on an item that outlives its deadline."""

    def __init__(self, call: Callable[[int], Any], first: int, n: int) -> None:
        super().__init__(daemon=True, name="reward-in-process")
        self.call, self.n = call, n
        self.index, self.started = first, time.monotonic()  # the item running now
        self.results: dict[int, tuple[bool, Any, float]] = {}  # ok, value or message, seconds
        self.abandoned = False
        self.cond = threading.Condition()

    def run(self) -> None:
        for i in range(self.index, self.n):
            with self.cond:
                if self.abandoned:
                    return
                self.index, self.started = i, time.monotonic()
            try:
                out = (True, self.call(i))
            except Exception as e:
                out = (False, f"{type(e).__name__}: {e}")
            with self.cond:
                if self.abandoned:
                    return
                self.results[i] = (*out, time.monotonic() - self.started)
        with self.cond:
            self.index = self.n
            self.cond.notify_all()

    def watch(self, timeout: float) -> int | None:
        """Wait until every item is done (None) or one outlives ``timeout`` (its index)."""
        with self.cond:
            # Woken once at the end, or at the running item's deadline to look again.
            while self.index < self.n:
                i, started = self.index, self.started
                remaining = started + timeout - time.monotonic()
                if remaining <= 0 and i not in self.results:
                    self.abandoned = True
                    return i
                self.cond.wait(timeout=None if remaining == float("inf") else max(remaining, 1e-3))
            return None


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
        report = self.run(responses, answers, prompts=prompts, metadata=metadata, timeout=timeout)
        report.warn()
        return report.scores

    def run(
        self,
        responses: Sequence[str],
        answers: Sequence[str],
        *,
        prompts: Sequence[str | None] | None = None,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        timeout: float | None = None,
    ) -> ScoreReport:
        """As `score`, with the failures counted instead of logged."""
        _check_lengths(responses, answers, prompts, metadata)
        timeout = self.timeout if timeout is None else timeout
        report = ScoreReport([0.0] * len(responses))
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
                index = worker.busy_index
                try:
                    status, index, value = worker.receive()
                except WorkerError as e:
                    report.fail(index, str(e))
                    replace(worker)
                    continue
                if status == "ok":
                    report.scores[index] = value  # the worker's `get_reward_fn` checked it
                else:
                    report.fail(index, value)
                idle.append(worker)
            now = time.monotonic()
            for conn, worker in list(busy.items()):
                if now >= worker.deadline:
                    message = f"exceeded {timeout:g} s; its worker was killed"
                    report.fail(worker.busy_index, message, timeout=True)
                    del busy[conn]
                    worker.kill()
                    replace(worker)
            if starting and now >= start_deadline:
                raise WorkerError(f"a reward worker did not start within {STARTUP_TIMEOUT_S} s.")
            if not starting:
                start_deadline = float("inf")
        return report

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
    every step). ``num_workers=0`` scores in this process (`score_in_process`): exceptions still
    score 0.0, math rewards still bound their symbolic check by their own timeout, and a result
    that comes back after ``timeout`` scores 0.0, but nothing can stop a custom function that
    hangs.
    """
    _check_lengths(responses, answers, prompts, metadata)
    if num_workers > 0:
        with RewardPool(fn, num_workers, timeout=timeout) as pool:
            return pool.score(responses, answers, prompts=prompts, metadata=metadata)
    report = score_in_process(get_reward_fn(fn), responses, answers, prompts=prompts,
                              metadata=metadata, timeout=timeout)  # fmt: skip
    report.warn()
    return report.scores
