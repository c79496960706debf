"""Multi-process runs: `jax.distributed` start-up, process-0 decisions, heartbeats.

Every process runs the same host program on the same global data; device arrays are global
`jax.Array`s over a mesh spanning every process (`jaxrlhf.models.make_mesh` uses
``jax.devices()``, which is global after `initialize`). Where the processes could disagree
(what to train on, when to save, when to stop), process 0 decides and the others follow
(`decide`, `broadcast_json`).

`initialize` takes the coordinator address / process count / id from the config, else from
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, else lets JAX
auto-detect them (Slurm, Open MPI, TPU pods). It also starts a `Heartbeat` watchdog: a
collective waiting on a dead peer would otherwise block forever, so each process publishes a
counter in the distributed key-value store and exits (non-zero, naming the silent process)
when a peer's counter stops moving for ``distributed.heartbeat_timeout_s``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np

from jaxrlhf.config import ConfigError, DistributedConfig
from jaxrlhf.errors import USER_ERRORS, RunStopped

T = TypeVar("T")

EXIT_PEER_LOST = 75  # exit status of a process that stops because a peer died or hung
_KEY = "jaxrlhf"
_state: dict[str, Any] = {"heartbeat": None, "seq": 0}


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer.") from None


def _cluster_detected() -> bool:
    """Whether JAX's own auto-detection has a multi-process launcher to read."""
    env = os.environ
    try:  # a Cloud TPU VM (pod or not): JAX reads the topology from the TPU metadata
        from jax._src.clusters.cloud_tpu_cluster import running_in_cloud_tpu_vm
    except ImportError:
        running_in_cloud_tpu_vm = False
    return (
        running_in_cloud_tpu_vm
        or int(env.get("SLURM_NTASKS", env.get("SLURM_STEP_NUM_TASKS", "1")) or 1) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
        or "TPU_WORKER_HOSTNAMES" in env
        or "MEGASCALE_COORDINATOR_ADDRESS" in env
    )


def resolve(cfg: DistributedConfig) -> tuple[str | None, int | None, int | None]:
    """(coordinator address, process count, process id) from ``cfg``, then the environment."""
    address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    count = cfg.num_processes if cfg.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = cfg.process_id if cfg.process_id is not None else _env_int("JAX_PROCESS_ID")
    if count is not None and count < 1:
        raise ConfigError(f"distributed.num_processes={count} must be >= 1.")
    if count is not None and pid is not None and not 0 <= pid < count:
        raise ConfigError(
            f"distributed.process_id={pid} must be in [0, {count}) for "
            f"distributed.num_processes={count}."
        )
    if count is not None and count > 1 and address is None and not _cluster_detected():
        raise ConfigError(
            f"distributed.num_processes={count} needs distributed.coordinator_address "
            "('host:port' of process 0) outside Slurm, Open MPI or a TPU pod."
        )
    return address, count, pid


def initialize(cfg: DistributedConfig) -> bool:
    """Join the multi-process run if one is configured or detected; False for one process.

    Must run before anything touches a JAX backend. On CPU the collectives go over gloo.
    """
    address, count, pid = resolve(cfg)
    if jax.distributed.is_initialized():
        return True
    if cfg.enabled is False:
        return False
    detected = count is not None or address is not None or _cluster_detected()
    if cfg.enabled is None and (count == 1 or not detected):
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = cfg.heartbeat_timeout_s
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=count,
        process_id=pid,
        initialization_timeout=int(cfg.initialization_timeout_s),
        # JAX's own detector must not fire first: its message names no process.
        heartbeat_timeout_seconds=int(2 * timeout) + 10,
    )
    _state["heartbeat"] = Heartbeat(timeout).start()
    return True


def is_main() -> bool:
    """Process 0: the one that decides, logs and writes plain files."""
    return jax.process_index() == 0


def decide(value: T) -> T:
    """Process 0's ``value`` (a bool or a number) on every process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    out = multihost_utils.broadcast_one_to_all(np.asarray(value))
    return type(value)(out.item())


def max_over_processes(value: int) -> int:
    """The largest of every process's ``value`` (e.g. a stop request any one of them received)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))


def broadcast_json(value: Any, name: str, timeout_s: float = 600.0) -> Any:
    """Process 0's JSON-serialisable ``value`` on every process, through the key-value store.

    Every process must call it the same number of times (keys are numbered per call).
    """
    if jax.process_count() == 1:
        return value
    client = _client()
    _state["seq"] += 1
    key = f"{_KEY}/bcast/{_state['seq']}/{name}"
    if is_main():
        client.key_value_set(key, json.dumps(value))
        return value
    return json.loads(client.blocking_key_value_get(key, int(timeout_s * 1000)))


def check_same(values: np.ndarray, what: str) -> None:
    """Raise unless every process holds process 0's ``values`` (e.g. the step's sample ids)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    ref = multihost_utils.broadcast_one_to_all(np.asarray(values))
    if not np.array_equal(np.asarray(ref), np.asarray(values)):
        raise RuntimeError(
            f"process {jax.process_index()} disagrees with process 0 on {what}; every "
            "process must run with the same config, seed and data."
        )


def finish() -> None:
    """End a multi-process run cleanly: meet every peer, stop the watchdog, leave."""
    if not jax.distributed.is_initialized():
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("jaxrlhf_finish")
    heartbeat = _state["heartbeat"]
    if heartbeat is not None:
        heartbeat.stop()
        _state["heartbeat"] = None
    jax.distributed.shutdown()


def guarded(fn: Callable[[], T]) -> T:
    """Run ``fn`` and handle its failure in a multi-process run.

    A config or data error, or a stop every process decided together (`RunStopped`), is the same
    on every process: re-raised at once (one line, its exit code). Any other exception may be the
    symptom of a dead peer (a failed collective), so the watchdog first gets its timeout to name
    one; then the traceback is printed and the process exits 1 without JAX's shutdown barrier,
    which would wait for peers that are blocked on this one.
    """
    try:
        return fn()
    except (*USER_ERRORS, RunStopped, KeyboardInterrupt):
        raise
    except Exception:
        heartbeat = _state["heartbeat"]
        if heartbeat is None:
            raise
        heartbeat.wait_for_verdict()
        traceback.print_exc()
        print(f"jaxrlhf: process {jax.process_index()} failed (traceback above); stopping.",
              file=sys.stderr, flush=True)  # fmt: skip
        os._exit(1)


def _client() -> Any:
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized; call distributed.initialize.")
    return client


class Heartbeat:
    """Per-process watchdog over the key-value store.

    A beat thread writes this process's counter and reads every peer's; a check thread (which
    makes no RPC, so it cannot block on a dead coordinator) exits the process when a peer's
    counter has not moved for ``timeout_s`` or the store itself has been unreachable that long.
    A process frozen whole (SIGSTOP, a hung host) stops beating too, so it is caught the same
    way; a process that ends cleanly marks itself done first.
    """

    def __init__(self, timeout_s: float, *, client: Any = None, process_id: int | None = None,
                 num_processes: int | None = None,
                 exit_fn: Callable[[int], Any] = os._exit) -> None:  # fmt: skip
        self.timeout_s = timeout_s
        self.exit_fn = exit_fn
        self.interval_s = min(max(timeout_s / 8, 0.05), 2.0)
        self.client = client or _client()
        self.pid = jax.process_index() if process_id is None else process_id
        self.count = jax.process_count() if num_processes is None else num_processes
        now = time.monotonic()
        self.last_seen = {p: now for p in range(self.count) if p != self.pid}
        self.last_value: dict[int, str] = {}
        self.done: set[int] = set()
        self.last_ok = now
        self.verdict: str | None = None
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._beat, name="jaxrlhf-heartbeat", daemon=True),
            threading.Thread(target=self._check, name="jaxrlhf-watchdog", daemon=True),
        ]

    def start(self) -> Heartbeat:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):  # the store may already be gone at shutdown
            self.client.key_value_set(f"{_KEY}/done/{self.pid}", "1", allow_overwrite=True)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2 * self.interval_s + 1)

    def _beat(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                self.client.key_value_set(f"{_KEY}/hb/{self.pid}", str(n), allow_overwrite=True)
                beats = dict(self.client.key_value_dir_get(f"{_KEY}/hb/"))
                done = dict(self.client.key_value_dir_get(f"{_KEY}/done/"))
            except Exception:
                self._stop.wait(self.interval_s)
                continue
            now = time.monotonic()
            self.last_ok = now
            self.done |= {int(k.rsplit("/", 1)[1]) for k in done}
            for key, value in beats.items():
                peer = int(key.rsplit("/", 1)[1])
                if peer in self.last_seen and self.last_value.get(peer) != value:
                    self.last_value[peer], self.last_seen[peer] = value, now
            self._stop.wait(self.interval_s)

    def _problem(self) -> str | None:
        now = time.monotonic()
        if now - self.last_ok > self.timeout_s:
            return (
                f"process {self.pid} lost the coordination service of process 0 for "
                f"{now - self.last_ok:.1f} s (timeout {self.timeout_s:g} s): process 0 is dead "
                "or hung; stopping."
            )
        for peer, seen in sorted(self.last_seen.items()):
            if peer not in self.done and now - seen > self.timeout_s:
                return (
                    f"process {peer} of {self.count} sent no heartbeat for {now - seen:.1f} s "
                    f"(timeout {self.timeout_s:g} s): it is dead or hung; process {self.pid} "
                    "stops."
                )
        return None

    def _check(self) -> None:
        while not self._stop.wait(self.interval_s / 2):
            problem = self._problem()
            if problem is not None:
                self.verdict = problem
                print(f"jaxrlhf: {problem}", file=sys.stderr, flush=True)
                self.exit_fn(EXIT_PEER_LOST)
                return

    def wait_for_verdict(self) -> None:
        """Block up to the timeout (plus a beat) while the check thread decides to exit."""
        deadline = time.monotonic() + self.timeout_s + 2 * self.interval_s
        while time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(self.interval_s)
