"""Entry point of a reward worker process: ``python -m jaxrlhf.rewards._worker_main FD PPID``.

Protocol (pickled over the inherited socket): one init dict in, ``("ready", None, None)`` or
``("init_error", None, message)`` out; then ``(index, args, kwargs)`` requests, each answered by
``("ok", index, value)`` or ``("error", index, message)``; ``None`` or EOF ends the worker.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    # A computation stuck in C code (a huge integer power) holds the GIL, so no Python watchdog
    # could run; the kernel kills us instead when the parent goes away (Linux only).
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(0)


def _load(init: dict[str, Any]) -> Any:
    sys.path[:] = init["sys_path"]
    from jaxrlhf.rewards import get_reward_fn, symbolic
    from jaxrlhf.rewards.base import load_object

    if init["inline_symbolic"]:
        symbolic.run_inline()
    spec = init["fn"]
    if isinstance(spec, bytes):
        try:
            spec = pickle.loads(spec)
        except Exception as e:
            raise RuntimeError(
                f"cannot load the reward function in a worker process ({type(e).__name__}: {e}); "
                f"define it in an importable module and pass it as 'package.module:function'."
            ) from None
    if init["as_reward"]:
        fn = get_reward_fn(spec)
    else:
        fn = load_object(spec, "worker function") if isinstance(spec, str) else spec
    if getattr(fn, "needs_symbolic", False):
        symbolic.warmup()
    return fn


def main(argv: list[str]) -> None:
    fd, parent_pid = int(argv[1]), int(argv[2])
    _die_with_parent(parent_pid)
    # Ctrl-C and a scheduler's SIGTERM / SIGUSR1 (sent to every process of a job) are the
    # parent's to act on: it saves and then ends the pool; the kernel ends us if it dies.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    conn = Connection(fd)
    init = conn.recv()
    if init["memory_limit_mb"]:
        import resource

        limit = init["memory_limit_mb"] * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        fn = _load(init)
    except Exception as e:
        conn.send(("init_error", None, str(e)))
        return
    conn.send(("ready", None, None))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        index, args, kwargs = request
        try:
            reply = ("ok", index, fn(*args, **kwargs))
        except Exception as e:
            reply = ("error", index, f"{type(e).__name__}: {e}")
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            conn.send(("error", index, f"result could not be sent back ({e})"))


if __name__ == "__main__":
    main(sys.argv)
