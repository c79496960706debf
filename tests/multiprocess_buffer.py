"""Writer and reader processes for the buffer stress test (`test_buffer.py`).

    python multiprocess_buffer.py write ROOT WRITER COUNT SEED [DIE_AT]
    python multiprocess_buffer.py read ROOT TOTAL BATCH SEED

A writer commits trajectories ``w<WRITER>-<i>`` for i < COUNT, skipping those already committed
(a restarted writer resumes), with random pauses; with DIE_AT it writes the data of entry DIE_AT
and exits before committing it (a crash between data and marker). A reader repeatedly takes a
batch of pending entries, checks each against the content its uid determines (a torn or wrong
entry is an error, exit 3) and marks the batch consumed, until TOTAL entries are consumed.
"""

import hashlib
import os
import random
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from jaxrlhf.system.buffer import TrajectoryBuffer, encode


def content(uid: str) -> dict[str, np.ndarray]:
    """The arrays entry ``uid`` must hold (a function of the uid alone)."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "little"))
    n = int(rng.integers(4, 200))
    return {
        "input_ids": rng.integers(0, 80, n).astype(np.int32),
        "logprobs": -rng.random(n).astype(np.float32),
        "versions": np.full(n, int(rng.integers(0, 5)), np.int32),
        "response_mask": (np.arange(n) >= n // 3).astype(np.float32),
        "reward": np.asarray(rng.random(), np.float32),
    }


def write(root: str, writer: int, count: int, seed: int, die_at: int | None) -> None:
    buf = TrajectoryBuffer(root)
    done = set(buf.committed())
    rng = random.Random(seed)
    for i in range(count):
        uid = f"w{writer}-{i:05d}"
        if uid in done:
            continue
        time.sleep(rng.uniform(0, 0.004))
        if i == die_at:
            buf.kv.write(f"data/{uid}", encode(content(uid), {"uid": uid})).result()
            os._exit(9)  # data on disk, never committed
        buf.put(uid, content(uid), {"writer": writer})


def read(root: str, total: int, batch: int, seed: int) -> None:
    buf = TrajectoryBuffer(root)
    rng = random.Random(seed)
    deadline = time.monotonic() + 120
    while len(buf.consumed) < total:
        if time.monotonic() > deadline:
            sys.exit(f"reader timed out with {len(buf.consumed)} of {total} consumed")
        uids = buf.choose(rng.randint(1, batch))
        if not uids:
            time.sleep(0.01)
            continue
        for t in buf.read_shard(uids, 0, 1):
            want = content(t.uid)
            same = set(want) == set(t.arrays) and all(
                np.array_equal(want[k], t.arrays[k]) for k in want
            )
            if not same:
                print(f"entry {t.uid} holds wrong data", file=sys.stderr)
                sys.exit(3)
        time.sleep(rng.uniform(0, 0.01))
        buf.mark_consumed(uids)


if __name__ == "__main__":
    mode, root, *rest = sys.argv[1:]
    if mode == "write":
        write(
            root, int(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]) if len(rest) > 3 else None
        )
    else:
        read(root, int(rest[0]), int(rest[1]), int(rest[2]))
