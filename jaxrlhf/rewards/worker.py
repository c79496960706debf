"""A worker process that runs one function per request and can be killed at a deadline.

Workers are fresh interpreters started with ``python -m jaxrlhf.rewards._worker_main`` rather
than through ``multiprocessing``: they never re-import the caller's ``__main__`` (a launcher that
pulls in JAX and transformers), never inherit a forked copy of a multithreaded process, and behave
the same under every start method. Requests and replies travel over a socket pair with
``multiprocessing.connection`` framing. POSIX only (``pass_fds``).
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import jaxrlhf

_PACKAGE_ROOT = str(Path(jaxrlhf.__file__).resolve().parent.parent)

_spawner: ThreadPoolExecutor | None = None
_spawner_pid = -1
_spawner_lock = threading.Lock()


def _popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen`` run on one long-lived thread.

    Workers ask the kernel to kill them when their parent goes (``PR_SET_PDEATHSIG``), and Linux
    ties that to the *thread* that started them: a worker started from a short-lived caller
    thread would die with it.
    """
    global _spawner, _spawner_pid
    with _spawner_lock:
        if _spawner is None or _spawner_pid != os.getpid():  # threads do not survive a fork
            _spawner = ThreadPoolExecutor(1, thread_name_prefix="jaxrlhf-reward-spawner")
            _spawner_pid = os.getpid()
        spawner = _spawner
    return spawner.submit(subprocess.Popen, *args, **kwargs).result()


class WorkerError(RuntimeError):
    """The worker could not start, could not load its function, or died."""


class WorkerTimeout(TimeoutError):
    """A request outlived its deadline; the worker has been killed."""


class Worker:
    """Handle on one worker process.

    Args:
      fn: a ``"module:function"`` path, a registered reward name (with ``as_reward``), or a
        picklable callable (pickled here, unpickled in the worker after ``sys.path`` is set).
      as_reward: wrap the function with :func:`jaxrlhf.rewards.get_reward_fn`.
      inline_symbolic: the worker's own caller enforces deadlines, so math rewards inside it run
        their symbolic check in-process instead of starting yet another helper process.
      memory_limit_mb: address-space limit for the worker (``RLIMIT_AS``), or None.
    """

    def __init__(
        self,
        fn: str | Callable[..., Any],
        *,
        as_reward: bool = False,
        inline_symbolic: bool = False,
        memory_limit_mb: int | None = None,
    ) -> None:
        self.busy_index: int | None = None
        self.deadline = float("inf")
        try:
            fn_payload: str | bytes = fn if isinstance(fn, str) else pickle.dumps(fn)
        except Exception as e:
            raise WorkerError(
                f"reward function {fn!r} cannot be sent to a worker process "
                f"({type(e).__name__}: {e}); pass a module-level function or "
                f"'package.module:function'."
            ) from None
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_ROOT, *filter(None, [env.get("PYTHONPATH")])])
        try:
            self.process = _popen(
                [
                    sys.executable,
                    "-m",
                    "jaxrlhf.rewards._worker_main",
                    str(child_sock.fileno()),
                    str(os.getpid()),
                ],
                pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.ready = False
        self.conn.send(
            {
                "sys_path": list(sys.path),
                "fn": fn_payload,
                "as_reward": as_reward,
                "inline_symbolic": inline_symbolic,
                "memory_limit_mb": memory_limit_mb,
            }
        )

    def handle_ready_message(self) -> None:
        """Consume the worker's start-up reply; raise WorkerError if it could not load."""
        try:
            status, _, message = self.conn.recv()
        except (EOFError, OSError):
            self.kill()
            raise WorkerError(
                f"reward worker exited during start-up (exit code {self.process.poll()})."
            ) from None
        if status != "ready":
            self.kill()
            raise WorkerError(message)
        self.ready = True

    def wait_ready(self, timeout: float) -> None:
        """Block until the worker has imported its function (start-up is not on any deadline)."""
        if not self.conn.poll(timeout):
            self.kill()
            raise WorkerError(f"reward worker did not start within {timeout:.0f} s.")
        self.handle_ready_message()

    def submit(self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float):
        """Send one request; its deadline starts now."""
        self.conn.send((index, args, kwargs))
        self.busy_index = index
        self.deadline = time.monotonic() + timeout

    def receive(self) -> tuple[str, int, Any]:
        """Read one reply ``(status, index, value_or_message)``; WorkerError if the worker died."""
        try:
            reply = self.conn.recv()
        except (EOFError, OSError):
            self.kill()
            raise WorkerError(
                f"reward worker died (exit code {self.process.poll()}) while scoring item "
                f"{self.busy_index}."
            ) from None
        self.busy_index = None
        self.deadline = float("inf")
        return reply

    def call(self, *args: Any, timeout: float, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in the worker; WorkerTimeout (worker killed) past timeout."""
        self.submit(0, args, kwargs, timeout)
        if not self.conn.poll(timeout):
            self.kill()
            raise WorkerTimeout(f"reward worker call exceeded {timeout:g} s.")
        status, _, value = self.receive()
        if status != "ok":
            raise WorkerError(value)
        return value

    @property
    def alive(self) -> bool:
        return self.process.poll() is None and not self.conn.closed

    def kill(self) -> None:
        """Kill the process now (a hung computation does not listen to anything gentler)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if not self.conn.closed:
            self.conn.close()

    def close(self) -> None:
        """Ask the worker to exit; kill it if it does not within a second."""
        if not self.conn.closed and self.process.poll() is None:
            try:
                self.conn.send(None)
                self.process.wait(timeout=1.0)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
