"""Multi-process runs for real: several CPU processes on localhost with gloo collectives.

One toy PPO run is done four ways (each process a subprocess of `multiprocess_ppo.py`):

- A: 1 process x 4 devices, 3 steps straight (the reference);
- K: 2 processes x 2 devices, process 1 SIGKILLed inside step 3's actor update;
- K resumed with 2 processes: completes the run from K's last complete checkpoint (step 1 or
  2: the step-2 save is asynchronous and may not have been committed before the kill);
- D: that same checkpoint resumed by 1 process x 4 devices (restore reshards).

The mesh is the same (data=4) in every case and every process runs the same program on the
same global batch, so the runs compute the same global program; only the transport of the
collectives differs (in-process vs gloo over TCP). See `test_two_by_two_equals_one_by_four`
for what is compared and how exactly.
"""

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxrlhf.config import ConfigError, DistributedConfig, load_config
from jaxrlhf.system import distributed
from jaxrlhf.system.local_processes import child_env, free_port

ROOT = Path(__file__).resolve().parents[1]
HELPER = str(Path(__file__).with_name("multiprocess_ppo.py"))

HEARTBEAT_S = 4.0
TINY = [
    "actor.vocab_size=80", "actor.hidden_size=32", "actor.intermediate_size=64",
    "actor.num_layers=1", "actor.num_heads=2", "actor.num_kv_heads=1",
    "data.batch_size=4", "data.eval_size=4", "generation.n_samples=2",
    "generation.max_new_tokens=4", "experiment.total_steps=3", "experiment.eval_every=0",
    "logging.progress=false", "sft_warmup.steps=0",
    "reward.fn=multiprocess_ppo:digit_count_reward", "algorithm.kl_coef=0.01",
    "checkpoint.save_every=1", "checkpoint.max_to_keep=3",
    f"distributed.heartbeat_timeout_s={HEARTBEAT_S}",
]  # fmt: skip


def _start(out: Path, n: int, devices: int, cache: Path, die: str | None = None):
    """``n`` processes of the helper with ``devices`` CPU devices each; (procs, logs)."""
    out.mkdir(parents=True, exist_ok=True)
    port, procs = free_port(), []
    for i in range(n):
        env = child_env(i, n, port, devices) if n > 1 else child_env(0, 1, port, devices)
        if n == 1:
            for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
                env.pop(key)
        env |= {"PYTHONPATH": str(Path(HELPER).parent), "JAX_COMPILATION_CACHE_DIR": str(cache),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # fmt: skip
        if die:
            env["JAXRLHF_TEST_DIE"] = die
        with open(out / f"p{i}.log", "w") as log:  # the child keeps its own descriptor
            cmd = [sys.executable, HELPER, str(out), *TINY]
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            )
    return procs


def _finish(procs, timeout: float = 240) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _result(out: Path):
    params = dict(np.load(out / "result.npz"))
    return params, json.loads((out / "result.json").read_text())


def _scenario(base: Path) -> dict:
    """Runs A, K, K resumed and D (module docstring); JSON-able facts about the kill."""
    cache = base / "jax_cache"
    a = _start(base / "a", 1, 4, cache)
    k = _start(base / "k", 2, 2, cache, die="1:3")
    t0 = time.monotonic()
    codes_k, exit_times = [], {}
    try:
        while any(p.poll() is None for p in k):
            for i, p in enumerate(k):
                if p.poll() is not None and i not in exit_times:
                    exit_times[i] = time.time()
            assert time.monotonic() - t0 < 240, "the killed run hung"
            time.sleep(0.05)
        for i in range(len(k)):
            exit_times.setdefault(i, time.time())
        codes_k = [p.returncode for p in k]
        codes_a = _finish(a)
    finally:
        _finish(a + k, 1)
    assert codes_a == [0], (base / "a" / "p0.log").read_text()[-3000:]
    killed = {
        "codes": codes_k,
        "survivor_log": (base / "k" / "p0.log").read_text(),
        "died_at": float((base / "k" / "died_at").read_text()),
        "survivor_exit": exit_times[0],
    }
    shutil.copytree(base / "k", base / "d", ignore=shutil.ignore_patterns("*.log", "died_at"))
    resumed = _start(base / "k", 2, 2, cache)
    different = _start(base / "d", 1, 4, cache)
    codes = _finish(resumed + different)
    logs = {f"{d}{i}": (base / d / f"p{i}.log").read_text() for d, i in
            (("k", 0), ("k", 1), ("d", 0))}  # fmt: skip
    assert codes == [0, 0, 0], "\n".join(t[-2000:] for t in logs.values())
    return {"killed": killed, "logs": logs}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The scenario, run once per session even when pytest-xdist spreads these tests over
    workers (they share the session's temporary root; a file lock elects the one that runs)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    base = root / "multihost_runs"
    base.mkdir(exist_ok=True)
    summary = base / "summary.json"
    with open(base / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not summary.exists():
            summary.write_text(json.dumps(_scenario(base)))
    info = json.loads(summary.read_text())
    return {"a": _result(base / "a"), "k": _result(base / "k"), "d": _result(base / "d"),
            "dirs": {"k": base / "k"}, **info}  # fmt: skip


def _max_diff(x, y) -> float:
    (pa, ha), (pb, hb) = x, y
    assert pa.keys() == pb.keys()
    diffs = [float(np.max(np.abs(pa[k] - pb[k]))) for k in pa]
    assert [h.get("step") for h in ha["eval"]] == [h.get("step") for h in hb["eval"]]
    for ra, rb in zip([*ha["history"], *ha["eval"]], [*hb["history"], *hb["eval"]], strict=True):
        assert ra.keys() == rb.keys()
        diffs += [abs(ra[m] - rb[m]) for m in ra if isinstance(ra[m], float | int)]
    return max(diffs)


def test_killed_process_is_named_within_the_timeout(runs):
    killed = runs["killed"]
    assert killed["codes"][1] == -9  # the victim: SIGKILL
    assert killed["codes"][0] == distributed.EXIT_PEER_LOST, killed["survivor_log"][-2000:]
    assert "process 1 of 2 sent no heartbeat" in killed["survivor_log"]
    waited = killed["survivor_exit"] - killed["died_at"]
    # The timeout runs from the victim's last heartbeat the survivor saw, which can precede the
    # kill by up to two beat intervals (the victim writes, the survivor reads, once per interval).
    beat = distributed.Heartbeat(HEARTBEAT_S, client=object(), process_id=0, num_processes=2)
    earliest = HEARTBEAT_S - 2 * beat.interval_s
    assert earliest <= waited < HEARTBEAT_S + 5, f"survivor exited {waited:.1f} s after the kill"


def test_two_by_two_equals_one_by_four(runs):
    """2 processes x 2 devices (steps 1-2, then resumed after the kill for step 3) against 1
    process x 4 devices: every metric of every step, the evals and the final parameters."""
    (_, ha), (_, hk) = runs["a"], runs["k"]
    assert (ha["processes"], ha["devices"], hk["processes"], hk["devices"]) == (1, 4, 2, 4)
    assert [h["policy/version"] for h in hk["history"]] == [1, 2, 3]
    assert any(abs(h["actor/grad_norm"]) > 0 for h in ha["history"])  # the run does learn
    assert _max_diff(runs["a"], runs["k"]) <= 1e-6


def test_buffer_batch_chosen_by_process_zero_read_in_slices(runs):
    """After the 2-process run: both processes committed trajectories to one store, process 0
    chose the batch, each process read its own half and the batch was recorded once."""
    out = runs["dirs"]["k"]
    shards = [json.loads((out / f"shard{i}.json").read_text()) for i in (0, 1)]
    batch = ["p0-0", "p0-1", "p0-2", "p1-0"]
    assert shards[0]["batch"] == shards[1]["batch"] == batch
    assert shards[0]["mine"] + shards[1]["mine"] == batch
    assert shards[0]["values"] + shards[1]["values"] == [0, 1, 2, 10]
    from jaxrlhf.system.buffer import TrajectoryBuffer

    buf = TrajectoryBuffer(str(out / "buffer"))
    assert buf.cursor == 1 and buf.pending() == ["p1-1", "p1-2"]


def test_resume_with_a_different_process_count(runs):
    """A 2-process checkpoint (step 2) resumed by 1 process x 4 devices reaches the same end."""
    assert runs["d"][1]["processes"] == 1
    assert _max_diff(runs["a"], runs["d"]) <= 1e-6
    same = re.search(r"resumed from step (\d)", runs["logs"]["k0"])
    other = re.search(r"resumed from step (\d)", runs["logs"]["d0"])
    assert same and other and same[1] == other[1] and same[1] in "12"


def test_bad_distributed_settings_are_one_sentence(monkeypatch):
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match=r"process_id \(2\) must be < distributed.num_proc"):
        load_config(ROOT / "configs" / "toy_ppo.yaml",
                    ["distributed.num_processes=2", "distributed.process_id=2"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"needs distributed\.coordinator_address"):
        distributed.resolve(DistributedConfig(num_processes=2, process_id=0))
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES='two' must be an integer"):
        distributed.resolve(DistributedConfig())
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "5")
    with pytest.raises(ConfigError, match=r"process_id=5 must be in \[0, 2\)"):
        distributed.resolve(DistributedConfig(coordinator_address="localhost:1"))
    # One process (nothing configured) never initializes jax.distributed.
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    monkeypatch.delenv("JAX_PROCESS_ID")
    assert distributed.initialize(DistributedConfig()) is False
    off = DistributedConfig(enabled=False, coordinator_address="localhost:1", num_processes=2)
    assert distributed.initialize(off) is False


def test_mesh_not_matching_the_global_device_count_is_one_line():
    """Through the local launcher: 2 processes x 2 devices and a mesh of 3 -> both processes
    print the same one-line config error naming the global device count and exit 2."""
    cmd = [sys.executable, str(ROOT / "launchers" / "local_processes.py"), "-n", "2",
           "--cpu-devices", "2", "--grace", "20", "--", "launchers/ppo.py",
           "--config", "configs/toy_ppo.yaml", "mesh.data=3", "logging.progress=false",
           f"distributed.heartbeat_timeout_s={HEARTBEAT_S}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout[-3000:]
    for p in (0, 1):
        line = f"[p{p}] config error: mesh data=3 x fsdp=1 x tensor=1 = 3 devices, but 4 are"
        assert line in out.stdout, out.stdout[-3000:]


def test_heartbeat_names_a_silent_peer():
    """The watchdog on a fake store: peer 2 beats, peer 1 never does -> named, exit called."""

    class Store:
        def __init__(self):
            self.kv = {}

        def key_value_set(self, key, value, allow_overwrite=False):
            self.kv[key] = value

        def key_value_dir_get(self, prefix):
            return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]

    store, exits = Store(), []
    hb = distributed.Heartbeat(0.6, client=store, process_id=0, num_processes=3,
                               exit_fn=exits.append)  # fmt: skip
    peer = distributed.Heartbeat(0.6, client=store, process_id=2, num_processes=3,
                                 exit_fn=lambda code: None)  # fmt: skip
    start = time.monotonic()
    hb.start()
    peer.start()
    while not exits and time.monotonic() - start < 5:
        time.sleep(0.02)
    hb.stop()
    peer.stop()
    assert exits == [distributed.EXIT_PEER_LOST]
    assert hb.verdict.startswith("process 1 of 3 sent no heartbeat")
    assert 0.6 <= time.monotonic() - start < 2.5
