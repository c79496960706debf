"""The tensorstore trajectory buffer: commit markers, exactly-once consumption, resume.

The stress test runs two writer processes and a reader process on one store with random
pauses: 1,000 trajectories; one writer dies between a data write and its commit, the other is
SIGKILLed at a random moment, the reader is SIGKILLed once too; all are restarted. Every
trajectory must end up in exactly one consumed batch, and every read must match the content its
uid determines (no torn or foreign entries).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxrlhf.system.buffer import TornEntryError, TrajectoryBuffer

HELPER = str(Path(__file__).with_name("multiprocess_buffer.py"))
PER_WRITER = 500


def _spawn(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, HELPER, *map(str, args)], stderr=subprocess.PIPE)


def _wait(proc: subprocess.Popen, timeout: float = 90) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_put_get_commit_and_torn_entry(tmp_path):
    buf = TrajectoryBuffer(str(tmp_path))
    ids = np.arange(7, dtype=np.int32)
    buf.put("a-1", {"input_ids": ids, "reward": np.float32(0.5)}, {"version": 3})
    buf.kv.write("data/b-1", b"half").result()  # data without a marker: invisible
    assert buf.committed() == ["a-1"]
    t = buf.get("a-1")
    assert np.array_equal(t.arrays["input_ids"], ids) and t.meta == {"version": 3, "uid": "a-1"}
    buf.kv.write("data/a-1", b"torn bytes").result()  # bytes replaced under a marker
    with pytest.raises(TornEntryError, match="a-1"):
        buf.get("a-1")
    with pytest.raises(ValueError, match="uid 'x/y'"):
        buf.put("x/y", {"input_ids": ids})


def test_consume_once_and_resume_from_cursor(tmp_path):
    buf = TrajectoryBuffer(f"file://{tmp_path}")
    for i in range(6):
        buf.put(f"t{i}", {"x": np.full(3, i)})
    first = buf.choose(4)
    assert buf.mark_consumed(first) == 1
    with pytest.raises(ValueError, match="twice"):
        buf.mark_consumed(first[:1])
    second = buf.choose(4)
    assert second == ["t4", "t5"] and buf.mark_consumed(second) == 2
    # A new process sees both batches; resuming a checkpoint taken after batch 1 re-offers
    # batch 2's trajectories (their training was lost) and nothing else.
    again = TrajectoryBuffer(str(tmp_path))
    assert again.cursor == 2 and again.pending() == []
    again.resume(1)
    assert again.cursor == 1 and again.pending() == ["t4", "t5"]
    assert TrajectoryBuffer(str(tmp_path)).pending() == ["t4", "t5"]
    assert buf.shard(["a", "b", "c", "d", "e"], 1, 2) == ["d", "e"]


def test_memory_store_round_trip():
    buf = TrajectoryBuffer("memory://")
    buf.put("m", {"v": np.ones(2, np.float32)})
    assert buf.pending() == ["m"] and buf.get("m").arrays["v"].tolist() == [1.0, 1.0]


def test_concurrent_writers_reader_and_kills(tmp_path):
    root, seed = str(tmp_path / "buf"), random.randrange(1 << 30)
    rng = random.Random(seed)
    total = 2 * PER_WRITER
    die_at = rng.randrange(50, PER_WRITER - 50)
    procs = []
    try:
        reader = _spawn("read", root, total, 32, seed)
        w0 = _spawn("write", root, 0, PER_WRITER, seed + 1, die_at)
        w1 = _spawn("write", root, 1, PER_WRITER, seed + 2)
        procs += [reader, w0, w1]
        time.sleep(rng.uniform(0.8, 1.5))  # after imports, somewhere in the writes
        w1.send_signal(signal.SIGKILL)
        reader.send_signal(signal.SIGKILL)
        assert _wait(w1) == -signal.SIGKILL, f"seed {seed}: writer 1 finished before the kill"
        assert _wait(reader) == -signal.SIGKILL
        assert _wait(w0) == 9, f"seed {seed}: writer 0 should die at entry {die_at}"
        orphan = f"w0-{die_at:05d}"
        committed = TrajectoryBuffer(root).committed()
        assert orphan not in committed  # its data is on disk, its marker is not
        assert bytes(TrajectoryBuffer(root).kv.read(f"data/{orphan}").result().value)
        # Restart all three: writers resume after their committed entries.
        reader = _spawn("read", root, total, 32, seed + 3)
        w0 = _spawn("write", root, 0, PER_WRITER, seed + 4)
        w1 = _spawn("write", root, 1, PER_WRITER, seed + 5)
        procs += [reader, w0, w1]
        for p in (w0, w1, reader):
            code = _wait(p)
            assert code == 0, f"seed {seed}: {p.args[2]} exited {code}: {p.stderr.read().decode()}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    buf = TrajectoryBuffer(root)
    batches = [json.loads(bytes(buf.kv.read(f"consumed/{i:010d}").result().value))
               for i in range(buf.cursor)]  # fmt: skip
    consumed = [u for b in batches for u in b]
    expected = {f"w{w}-{i:05d}" for w in (0, 1) for i in range(PER_WRITER)}
    assert len(consumed) == len(set(consumed)), f"seed {seed}: a trajectory was trained twice"
    assert set(consumed) == expected, f"seed {seed}: lost {sorted(expected - set(consumed))[:5]}"
    assert set(buf.committed()) == expected
    assert not os.path.exists(os.path.join(root, "index", "w2-00000"))
