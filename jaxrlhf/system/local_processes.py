"""N local processes of one multi-process run: the environment each child needs, and a launcher
that starts them, prefixes their output and stops the rest when one fails.

Each child gets ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (read
by `jaxrlhf.system.distributed.initialize`) and, with ``cpu_devices``, that many forced CPU
devices and gloo collectives. ``launchers/local_processes.py`` is the command line; tests build
their own children with `child_env` / `free_port`. Standard library only: the launching process
never imports JAX.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def child_env(pid: int, n: int, port: int, cpu_devices: int | None) -> dict[str, str]:
    """The environment of process ``pid`` of ``n`` whose coordinator listens on ``port``."""
    env = dict(os.environ)
    env |= {
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
        "JAX_NUM_PROCESSES": str(n),
        "JAX_PROCESS_ID": str(pid),
        "PYTHONUNBUFFERED": "1",
    }
    if cpu_devices is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
        env["XLA_FLAGS"] = " ".join(
            [*flags, f"--xla_force_host_platform_device_count={cpu_devices}"]
        )
        env["JAX_PLATFORMS"] = "cpu"
    return env


def _pump(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:  # type: ignore[union-attr]
        sys.stdout.write(f"{prefix} {line}")
        sys.stdout.flush()


def launch(
    command: list[str],
    n: int,
    *,
    cpu_devices: int | None = None,
    port: int | None = None,
    grace_s: float = 90.0,
) -> int:
    """Run ``python command`` as ``n`` processes; the first non-zero exit status, or 0."""
    if n < 1:
        raise SystemExit(f"-n {n}: the number of processes must be >= 1.")
    port = port or free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, *command],
            env=child_env(i, n, port, cpu_devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]
    pumps = [threading.Thread(target=_pump, args=(p, f"[p{i}]")) for i, p in enumerate(procs)]
    for t in pumps:
        t.start()
    status, deadline = 0, None
    try:
        while any(p.poll() is None for p in procs):
            for p in procs:
                if status == 0 and p.returncode not in (None, 0):
                    status, deadline = p.returncode, time.monotonic() + grace_s
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()
        for t in pumps:
            t.join()
    return status or next((p.returncode for p in procs if p.returncode), 0)
