"""Async PPO staleness control: capacity + selection rules under slow / fast generators and
trainers (a discrete-event simulation, and real threads on `TrajectoryQueue`)."""

import heapq
import random
import threading
import time

import pytest

from jaxrlhf.system.staleness import (
    GroupInfo,
    StalenessError,
    capacity,
    select_batch,
    staleness_histogram,
)
from jaxrlhf.system.trajectory_queue import BufferClosed, TrajectoryQueue


def simulate(eta, batch, slots, gen_scale, train_s, steps, seed, capacity_fn=capacity):
    """Generator with ``slots`` concurrent groups (Pareto-tailed durations x ``gen_scale``) and a
    trainer taking ``train_s`` per update. Returns (batches, versions at consumption, lags)."""
    rng = random.Random(seed)
    t, version, submitted = 0.0, 0, 0
    groups: dict[int, GroupInfo] = {}
    running: list[tuple[float, int]] = []  # (finish time, uid)
    batches, lags = [], []
    train_done: float | None = None
    while len(batches) < steps:
        while len(running) < slots and capacity_fn(eta, version, batch, submitted) > 0:
            uid = submitted
            submitted += 1
            # The first token is produced under the weights current now (>= submit version).
            groups[uid] = GroupInfo(uid, version, False, version)
            heapq.heappush(running, (t + gen_scale * rng.paretovariate(1.5), uid))
        if train_done is None:
            chosen = select_batch(groups.values(), version, eta, batch)
            if chosen is not None:
                lags.append([version - groups[u].min_version for u in chosen])
                batches.append(chosen)
                for u in chosen:
                    del groups[u]
                train_done = t + train_s
                continue
        # Advance to the next event: a group finishes or the update lands.
        next_finish = running[0][0] if running else float("inf")
        if train_done is not None and train_done <= next_finish:
            t, train_done, version = train_done, None, version + 1
        else:
            t, uid = heapq.heappop(running)
            g = groups[uid]
            groups[uid] = GroupInfo(uid, g.submit_version, True, g.min_version)
    return batches, lags, submitted


CASES = [  # (eta, gen_scale, train_s): slow trainer, fast trainer, balanced
    (0, 1.0, 1.0),
    (1, 0.1, 5.0),
    (1, 5.0, 0.1),
    (2, 0.2, 3.0),
    (3, 1.0, 1.0),
    (4, 3.0, 0.2),
    (4, 1.0, 0.05),  # fast trainer, deep pipeline: breaks "fill with newer finished groups"
]


@pytest.mark.parametrize("eta,gen_scale,train_s", CASES)
@pytest.mark.parametrize("seed", range(5))
def test_staleness_bounded_and_every_group_used_once(eta, gen_scale, train_s, seed):
    batch, steps = 4, 25
    batches, lags, submitted = simulate(eta, batch, 64, gen_scale, train_s, steps, seed)
    assert all(len(b) == batch for b in batches)
    assert max(max(lag) for lag in lags) <= eta
    used = [u for b in batches for u in b]
    assert len(used) == len(set(used))  # never twice
    assert submitted <= (eta + steps + 1) * batch  # the capacity rule: never more in flight
    # Never dropped: a group admitted at version s is consumed by update s + eta at the latest,
    # so after `steps` updates every uid below (steps - eta) * batch has been used.
    assert set(range(max(0, steps - eta) * batch)) <= set(used)


@pytest.mark.parametrize("seed", range(5))
def test_eta_zero_is_synchronous(seed):
    batches, lags, _ = simulate(0, 4, 3, 1.0, 1.0, 10, seed)
    assert batches == [list(range(4 * k, 4 * k + 4)) for k in range(10)]
    assert all(lag == [0] * 4 for lag in lags)


def test_slow_trainer_would_break_the_bound_without_the_capacity_rule():
    """The property tests can fail: without throttling a fast generator outruns the trainer."""
    unlimited = lambda eta, version, batch, submitted: 1
    with pytest.raises(StalenessError):
        simulate(1, 4, 6, 0.1, 5.0, 25, 0, capacity_fn=unlimited)


def test_selection_rules():
    g = lambda uid, s, ready=True, v=None: GroupInfo(uid, s, ready, s if v is None else v)
    # A mandatory group (submitted at <= V - eta) still running: wait even if others are ready.
    assert select_batch([g(0, 0, False), g(1, 1), g(2, 1)], 1, 1, 2) is None
    assert select_batch([g(0, 0), g(1, 1), g(2, 1), g(3, 0)], 1, 1, 2) == [0, 3]
    # Oldest first among the optional ones; fewer than a batch ready: wait.
    assert select_batch([g(5, 2), g(4, 1), g(6, 1)], 2, 2, 2) == [4, 6]
    assert select_batch([g(4, 2)], 2, 2, 2) is None
    # Among groups of the same version the finished ones go first; never a newer one instead
    # of an older one still running (the older would miss its deadline later).
    assert select_batch([g(0, 1, False), g(1, 1), g(2, 1)], 1, 1, 2) == [1, 2]
    assert select_batch([g(0, 0, False), g(1, 1), g(2, 1)], 1, 2, 2) is None
    with pytest.raises(StalenessError):  # a token too old is never admitted
        select_batch([g(0, 3, v=0)], 3, 1, 1)
    assert capacity(2, 3, 4, 20) == 4 and capacity(0, 0, 4, 4) == 0
    h = staleness_histogram(5, [5, 4, 4, 3], 2)
    assert h["async/staleness_1"] == 0.5 and h["async/staleness_max"] == 2.0


@pytest.mark.parametrize("eta,gen_s,train_s", [(1, 0.0005, 0.01), (2, 0.01, 0.0005)])
def test_queue_threads_slow_and_fast(eta, gen_s, train_s):
    """Real threads: a producer with random delays, a trainer with a fixed one."""
    batch, steps = 3, 12
    queue = TrajectoryQueue(batch, eta)
    rng = random.Random(0)
    version_now = [0]
    errors = []

    def produce():
        try:
            while True:
                uid, version = queue.reserve()
                time.sleep(gen_s * rng.paretovariate(1.5))
                # Tokens come from the newest weights seen while generating.
                threading.Thread(target=queue.put, args=(uid, uid, max(version, 0))).start()
        except BufferClosed:
            pass
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    used, lags = [], []
    for _ in range(steps):
        taken = queue.take_batch(timeout=30)
        lags += [version_now[0] - v for _, _, v in taken]
        used += [uid for uid, item, _ in taken if uid == item]
        time.sleep(train_s)
        version_now[0] += 1
        queue.set_version(version_now[0])
    queue.close()
    producer.join(5)
    assert not errors
    assert max(lags) <= eta and len(used) == len(set(used)) == steps * batch
    assert set(range((steps - eta) * batch)) <= set(used)
    stats = queue.stats()
    assert stats["async/submitted"] <= (eta + steps + 1) * batch


def test_queue_created_at_a_later_version_counts_earlier_batches():
    """A resumed run's queue (version V) admits (η + 1) batches, as a fresh one does, not
    (η + V + 1): the V·B groups trained before count as submitted."""
    eta, batch, version = 1, 3, 5
    queue = TrajectoryQueue(batch, eta, version=version)
    reserved = []
    while (r := queue.reserve(timeout=0)) is not None:
        reserved.append(r)
    assert len(reserved) == (eta + 1) * batch
    assert {v for _, v in reserved} == {version}
    assert queue.stats()["async/submitted"] == (eta + 1 + version) * batch
