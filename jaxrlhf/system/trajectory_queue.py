"""In-process trajectory buffer of asynchronous PPO: producers reserve, finish; the trainer takes.

`TrajectoryBuffer` is the interface the async coordinator uses, so another store (e.g. one
shared between hosts) can be swapped in; `TrajectoryQueue` is the in-process implementation, a
condition-variable-guarded map of outstanding groups that applies the rules of
`jaxrlhf.system.staleness` under one lock (reservation and selection never race).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from jaxrlhf.system.staleness import GroupInfo, StalenessError, capacity, select_batch


class BufferClosed(RuntimeError):
    """The buffer was closed while a producer or the trainer waited on it."""


class TrajectoryBuffer(Protocol):
    """What the async coordinator needs from a trajectory store."""

    def reserve(self, timeout: float | None = None) -> tuple[int, int] | None:
        """Block until the capacity rule admits one more group; (uid, submit version)."""

    def put(self, uid: int, item: Any, min_version: int) -> None:
        """A reserved group finished: its payload and the oldest token's version."""

    def take_batch(self, timeout: float | None = None) -> list[tuple[int, Any, int]]:
        """The next train batch: (uid, payload, min version) in submission order."""

    def set_version(self, version: int) -> None:
        """The trainer's new policy version; call it after ``update_weights`` returned, so that
        every group reserved from then on runs under those weights or newer (the server holds
        requests submitted after an update until it has applied it)."""

    def stats(self) -> dict[str, float]:
        """Depth and counters for metrics."""

    def close(self) -> None:
        """Wake every waiter with `BufferClosed`."""


class TrajectoryQueue:
    """`TrajectoryBuffer` for one process: groups of ``batch_size`` per batch, lag <= ``eta``."""

    def __init__(self, batch_size: int, eta: int, version: int = 0) -> None:
        if batch_size < 1 or eta < 0:
            raise ValueError(f"batch_size={batch_size}, eta={eta}: need >= 1 and >= 0.")
        self.batch_size, self.eta = batch_size, eta
        self._version = version
        # Groups ever reserved (the capacity rule counts consumed ones too). A queue created at
        # version V (a resumed run) counts the V batches trained before as submitted; counting
        # from 0 would let the producers put V more batches in flight than η allows.
        self._submitted = version * batch_size
        self._groups: dict[int, GroupInfo] = {}
        self._items: dict[int, Any] = {}
        self._consumed: set[int] = set()
        self._closed = False
        self._cond = threading.Condition()
        self.wait_s = {"producer": 0.0, "trainer": 0.0}

    @property
    def version(self) -> int:
        return self._version

    def reserve(self, timeout: float | None = None) -> tuple[int, int] | None:
        start = time.perf_counter()
        with self._cond:
            ok = self._cond.wait_for(
                lambda: (
                    self._closed
                    or capacity(self.eta, self._version, self.batch_size, self._submitted) > 0
                ),
                timeout,
            )
            self.wait_s["producer"] += time.perf_counter() - start
            self._check_open()
            if not ok:
                return None
            uid = self._submitted
            self._submitted += 1
            self._groups[uid] = GroupInfo(uid, self._version, ready=False)
            return uid, self._version

    def put(self, uid: int, item: Any, min_version: int) -> None:
        with self._cond:
            group = self._groups.get(uid)
            if group is None or group.ready:
                raise StalenessError(f"group {uid} was not reserved or is already in the buffer.")
            self._groups[uid] = GroupInfo(uid, group.submit_version, True, min_version)
            self._items[uid] = item
            self._cond.notify_all()

    def take_batch(self, timeout: float | None = None) -> list[tuple[int, Any, int]]:
        start = time.perf_counter()
        with self._cond:
            chosen: list[int] | None = None

            def ready() -> bool:
                nonlocal chosen
                if self._closed:
                    return True
                chosen = select_batch(
                    self._groups.values(), self._version, self.eta, self.batch_size
                )
                return chosen is not None

            ok = self._cond.wait_for(ready, timeout)
            self.wait_s["trainer"] += time.perf_counter() - start
            self._check_open()
            if not ok or chosen is None:
                raise TimeoutError(f"no train batch ready within {timeout} s.")
            out = []
            for uid in chosen:
                if uid in self._consumed:
                    raise StalenessError(f"group {uid} would be used twice.")
                self._consumed.add(uid)
                group = self._groups.pop(uid)
                out.append((uid, self._items.pop(uid), group.min_version))
            return out

    def set_version(self, version: int) -> None:
        with self._cond:
            self._version = version
            self._cond.notify_all()

    def stats(self) -> dict[str, float]:
        with self._cond:
            ready = sum(g.ready for g in self._groups.values())
            return {
                "async/buffer_depth": ready,
                "async/in_flight": len(self._groups) - ready,
                "async/submitted": self._submitted,
                "async/consumed": len(self._consumed),
            }

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise BufferClosed("the trajectory buffer is closed.")
