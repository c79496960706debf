"""Run one benchmark mode in a fresh subprocess and read back its last-line JSON."""

from __future__ import annotations

import json
import os
import subprocess


def run_json_child(cmd: list[str], *, pin_last_core: bool, timeout: int) -> dict:
    """``cmd``'s last printed line as a dict, with the load average around the run.

    ``pin_last_core``: run it on the last CPU only (the async trainer; its generator process
    takes the other cores). A failed run gives ``{"status": "failed", "stderr": ...}``.
    """
    n = os.cpu_count() or 1
    if pin_last_core and n > 1:
        cmd = ["taskset", "-c", str(n - 1), *cmd]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"status": "failed", "stderr": proc.stderr[-3000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["loadavg_before_after"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    return result
