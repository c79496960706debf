"""Staleness control of asynchronous PPO: AReaL's capacity rule and the batch-selection rule.

Pure host logic (no threads, no devices), so the guarantees are property-tested directly.

Units are *groups*: one prompt with its ``n`` samples (a GRPO group is never split); a train
batch is ``batch_size`` groups. With η = ``max_head_offpolicyness`` and trainer version V:

* **Capacity** (producers): a group may be submitted only while the number of groups ever
  submitted is below ``(η + V + 1) * B``; it is stamped with its submit version s.
* **Selection** (trainer, before the update V -> V + 1): the batch is the B outstanding groups
  with the oldest submit versions (ready ones first among equals), waiting while one of them
  still runs: earliest-deadline-first, the deadline of a group being ``s + η``.

Why this bounds staleness: by the capacity rule at most ``(d + 1) * B`` groups ever have a
deadline ``<= d``, and B groups are consumed per version, so EDF meets every deadline: a group
submitted at s is consumed at a version ``<= s + η``. Its tokens were produced at versions
``>= s`` (the trainer publishes version s to the generation server before the buffer stamps any
group with it, and the server never runs a request under weights older than those published
when it was submitted), so ``V - min(token version) <= η``. Filling a batch with newer finished
groups while older ones still run would break this (the older ones pile up past their deadline;
the simulation in ``tests/test_staleness.py`` finds such cases). With η = 0 the trainer takes
exactly the groups of the previous submission round: the synchronous algorithm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class GroupInfo:
    """What selection needs to know about one outstanding group."""

    uid: int  # submission order (0, 1, 2, ...), unique over the run
    submit_version: int  # trainer version when the producer admitted it
    ready: bool  # finished generating (and sits in the buffer)
    min_version: int | None = None  # oldest token's version, once ready


class StalenessError(RuntimeError):
    """A batch would break the η bound or reuse a group: a bug, never a user error."""


def capacity(eta: int, version: int, batch_size: int, submitted: int) -> int:
    """Groups the producers may still submit now (AReaL: (η + V + 1) * B minus submitted)."""
    return max(0, (eta + version + 1) * batch_size - submitted)


def select_batch(
    groups: Iterable[GroupInfo], version: int, eta: int, batch_size: int
) -> list[int] | None:
    """The uids of the next train batch (in submission order), or None if it must wait.

    The ``batch_size`` groups with the oldest submit versions (ready first among equals); None
    while fewer are outstanding or one of them still runs.
    """
    ordered = sorted(groups, key=lambda g: (g.submit_version, not g.ready, g.uid))
    overdue = [g for g in ordered if g.submit_version <= version - eta]
    if len(overdue) > batch_size:
        raise StalenessError(
            f"{len(overdue)} groups must be consumed at version {version} (η={eta}) but a "
            f"batch holds {batch_size}: the capacity rule was not applied."
        )
    chosen = ordered[:batch_size]
    if len(chosen) < batch_size or not all(g.ready for g in chosen):
        return None
    for g in chosen:
        if g.min_version is not None and version - g.min_version > eta:
            raise StalenessError(
                f"group {g.uid} has a token of version {g.min_version}, {version - g.min_version}"
                f" versions behind trainer version {version} (η={eta})."
            )
    return sorted(g.uid for g in chosen)


def staleness_histogram(version: int, min_versions: Sequence[int], eta: int) -> dict[str, float]:
    """Per-batch metrics: fraction of groups k versions behind (k = 0..η), mean and max."""
    lags = [version - v for v in min_versions]
    out = {
        f"async/staleness_{k}": sum(lag == k for lag in lags) / len(lags) for k in range(eta + 1)
    }
    out["async/staleness_mean"] = sum(lags) / len(lags)
    out["async/staleness_max"] = float(max(lags))
    return out
