"""Trajectory buffer on a tensorstore key-value store, shared by every host of a run.

Layout under the store's root (local directory or ``memory://`` for one host; a shared file
system, ``gs://`` or ``s3://`` for pods):

- ``data/<uid>``: one trajectory (token ids, log-probs, versions, rewards, masks, ... as an
  ``.npz`` without pickles, plus a JSON header), written by whichever host generated it;
- ``index/<uid>``: its commit marker (size and SHA-256 of the data), written only after the
  data write has returned. Readers list ``index/`` alone, so they never see an entry whose data
  is incomplete, and verify the checksum on every read;
- ``consumed/<seq>``: the uids of trained batch ``seq`` (0, 1, ...), written by process 0 after
  the batch was taken. The batch count is the buffer cursor that checkpoints store.

Exactly-once: every trajectory is in at most one consumed batch (`choose` skips consumed uids);
a writer that dies between data and marker leaves an invisible orphan, which its restart
overwrites (keys are the trajectory's uid, not a write counter); on resume `resume(cursor)`
forgets the batches after the checkpoint (their training was lost with the crash), so they are
offered again and nothing committed is lost. Single-key writes are atomic in tensorstore's
drivers (the file driver writes a temporary file and renames it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

_UID = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_META = "__meta__"


class TornEntryError(RuntimeError):
    """A committed entry whose bytes do not match its commit marker."""


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """One stored trajectory: named host arrays and a JSON-able header."""

    uid: str
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


def open_kvstore(where: str | Mapping[str, Any]) -> ts.KvStore:
    """A tensorstore `KvStore`: a spec dict, a URL (``memory://``, ``file:///``, ``gs://``,
    ``s3://``) or a local directory."""
    if isinstance(where, Mapping):
        spec: Any = dict(where)
    elif "://" in where:
        spec = where if where.endswith("/") else where + "/"
    else:
        spec = {"driver": "file", "path": where.rstrip("/") + "/"}
    return ts.KvStore.open(spec).result()


def encode(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> bytes:
    """Arrays and header as ``.npz`` bytes (no pickles)."""
    out = io.BytesIO()
    header = np.frombuffer(json.dumps(dict(meta), sort_keys=True).encode(), np.uint8)
    np.savez(out, **{k: np.asarray(v) for k, v in arrays.items()}, **{_META: header})
    return out.getvalue()


def decode(raw: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with np.load(io.BytesIO(raw), allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files if k != _META}
        meta = json.loads(f[_META].tobytes().decode())
    return arrays, meta


def _keys(kv: ts.KvStore, prefix: str) -> list[str]:
    found = kv.list(ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))).result()
    return sorted(k.decode()[len(prefix) :] for k in found)


class TrajectoryBuffer:
    """Committed trajectories and the batches already trained on; see the module docstring."""

    def __init__(self, where: str | Mapping[str, Any]) -> None:
        self.kv = open_kvstore(where)
        self.consumed: set[str] = set()
        self.cursor = 0  # consumed batches so far
        self._load_consumed()

    # ------------------------------------------------------------------ writers (any host)

    def put(
        self, uid: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None
    ) -> None:
        """Write trajectory ``uid``, then commit it. Rewriting an uncommitted uid is allowed."""
        if not _UID.match(uid):
            raise ValueError(
                f"trajectory uid {uid!r} must be 1-200 characters of letters, digits, '.', '_' "
                "or '-'."
            )
        raw = encode(arrays, {**(meta or {}), "uid": uid})
        self.kv.write(f"data/{uid}", raw).result()
        marker = {"sha256": hashlib.sha256(raw).hexdigest(), "nbytes": len(raw)}
        self.kv.write(f"index/{uid}", json.dumps(marker).encode()).result()

    # ------------------------------------------------------------------ readers

    def committed(self) -> list[str]:
        """Uids whose commit marker exists (their data is complete), sorted."""
        return _keys(self.kv, "index/")

    def pending(self) -> list[str]:
        """Committed uids not yet in a consumed batch, sorted."""
        return [u for u in self.committed() if u not in self.consumed]

    def get(self, uid: str) -> Trajectory:
        """Committed trajectory ``uid``; `TornEntryError` if its bytes fail the marker."""
        marker = self.kv.read(f"index/{uid}").result()
        if marker.state != "value":
            raise KeyError(f"trajectory {uid!r} is not committed.")
        want = json.loads(bytes(marker.value))
        raw = bytes(self.kv.read(f"data/{uid}").result().value)
        if len(raw) != want["nbytes"] or hashlib.sha256(raw).hexdigest() != want["sha256"]:
            raise TornEntryError(
                f"trajectory {uid!r} has {len(raw)} bytes that do not match its commit marker "
                f"({want['nbytes']} bytes, sha256 {want['sha256'][:12]}...)."
            )
        arrays, meta = decode(raw)
        return Trajectory(uid, arrays, meta)

    def choose(self, size: int) -> list[str]:
        """Process 0's pick of the next batch: up to ``size`` pending uids (broadcast it with
        `jaxrlhf.system.distributed.broadcast_json` so every process trains on the same)."""
        return self.pending()[:size]

    @staticmethod
    def shard(uids: Sequence[str], index: int, count: int) -> list[str]:
        """The contiguous slice of a global batch that process ``index`` of ``count`` reads."""
        parts = np.array_split(np.arange(len(uids)), count)
        return [uids[i] for i in parts[index]]

    def read_shard(self, uids: Sequence[str], index: int, count: int) -> list[Trajectory]:
        return [self.get(u) for u in self.shard(uids, index, count)]

    # ------------------------------------------------------------------ consumption (process 0)

    def mark_consumed(self, uids: Sequence[str], *, write: bool = True) -> int:
        """Record batch ``cursor`` as trained on; returns the new cursor (store it in the
        checkpoint). In a multi-process run only process 0 writes (``write``); the others
        update their view."""
        twice = sorted(set(uids) & self.consumed)
        if twice or len(set(uids)) != len(uids):
            raise ValueError(f"trajectories {twice or list(uids)} would be trained on twice.")
        if write:
            key = f"consumed/{self.cursor:010d}"
            self.kv.write(key, json.dumps(list(uids)).encode()).result()
        self.consumed.update(uids)
        self.cursor += 1
        return self.cursor

    def take_batch(self, size: int) -> tuple[list[str], list[Trajectory]]:
        """Every process of a run: process 0 picks the next batch, all get its uids, each reads
        its own slice. Returns (the global batch's uids, this process's trajectories)."""
        import jax

        from jaxrlhf.system import distributed

        uids = distributed.broadcast_json(
            self.choose(size) if distributed.is_main() else None, "buffer_batch"
        )
        return uids, self.read_shard(uids, jax.process_index(), jax.process_count())

    def resume(self, cursor: int) -> None:
        """Forget the batches from ``cursor`` on (taken after the checkpoint being resumed):
        their trajectories are offered again."""
        for name in _keys(self.kv, "consumed/"):
            if int(name) >= cursor:
                key = f"consumed/{name}"
                self.kv.delete_range(ts.KvStore.KeyRange(key, key + "\0")).result()
        self._load_consumed()
        if self.cursor != cursor:
            raise ValueError(
                f"buffer cursor {cursor} (from the checkpoint) is ahead of the {self.cursor} "
                "consumed batches in the store; resume with the store the run wrote."
            )

    def _load_consumed(self) -> None:
        names = _keys(self.kv, "consumed/")
        self.consumed, self.cursor = set(), len(names)
        for name in names:
            self.consumed.update(json.loads(bytes(self.kv.read(f"consumed/{name}").result().value)))
