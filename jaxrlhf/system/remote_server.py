"""A `GenerationServer` in its own process: the disaggregated generator of async PPO on a host
whose devices cannot run two programs at once (XLA:CPU runs every device on one shared
thread pool, so two sub-meshes of one process compete for the same cores).

The child process owns its devices and, when the parent is pinned to a subset of the CPUs, the
remaining CPUs, so generation and training each get their own cores. Requests and results cross
a pipe as host arrays; weights cross as a host copy of the train params (`update_weights`), and
the child lays them onto its generation mesh (``jax.device_put``) between decode chunks, as the
in-process server does. Same surface as `GenerationServer`: ``submit`` / ``update_weights`` /
``health`` / ``close``.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import signal
import threading
from typing import Any

import jax

from jaxrlhf.generation.server import RequestHandle
from jaxrlhf.generation.types import InvalidRequestError, SamplingParams, prompt_token_ids
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.system.run_guards import STOP_SIGNALS


def free_cpus() -> set[int] | None:
    """CPUs this process is not pinned to (None if it may use all of them)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    rest = set(range(os.cpu_count() or 1)) - os.sched_getaffinity(0)
    return rest or None


def _serve(conn, cfg: TransformerConfig, params: Any, n_devices: int, cpus, kwargs) -> None:
    """Child main: pin, start JAX on ``n_devices`` CPU devices, serve requests from ``conn``."""
    # Stop signals are the parent's to act on (a terminal's Ctrl-C and Slurm's signals reach
    # every process of the job); the parent ends this one with "close" or by closing the pipe.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if cpus:
        os.sched_setaffinity(0, cpus)  # before JAX sizes its thread pool from the affinity
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    import jax as child_jax

    from jaxrlhf.generation.server import GenerationServer
    from jaxrlhf.models import ModelHandle, make_mesh, param_shardings

    mesh = make_mesh(-1, 1, 1, devices=child_jax.devices()[:n_devices])
    params = child_jax.device_put(params, param_shardings(cfg, mesh))
    server = GenerationServer(ModelHandle(cfg, params, mesh), **kwargs)
    lock = threading.Lock()

    def send(message) -> None:
        with lock:
            conn.send(message)

    def reply(rid: str, handle) -> None:
        error = handle.exception()
        send(("done", rid, None if error else handle.result(), error))

    while True:
        message = conn.recv()
        kind = message[0]
        if kind == "submit":
            _, rid, prompt, sampling = message
            server.submit(prompt, sampling, request_id=rid).add_done_callback(
                lambda h, rid=rid: reply(rid, h)
            )
        elif kind == "weights":
            server.update_weights(message[1], message[2])
        elif kind == "health":
            send(("health", server.health()))
        elif kind == "close":
            server.close()
            send(("closed",))
            return


class RemoteGenerationServer:
    """Process-backed twin of `GenerationServer` (see the module docstring)."""

    def __init__(
        self,
        cfg: TransformerConfig,
        params: Any,
        *,
        n_devices: int = 1,
        cpus: set[int] | None = None,
        version: int = 0,
        name: str = "remote-gen",
        **server_kwargs: Any,
    ) -> None:
        self.name, self._version = name, version
        cpus = free_cpus() if cpus is None else cpus
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        kwargs = dict(server_kwargs, version=version, name=name, threaded=True)
        self._process = ctx.Process(
            target=_serve,
            args=(child, cfg, jax.device_get(params), n_devices, cpus, kwargs),
            name=name,
            daemon=True,
        )
        self._process.start()
        child.close()
        self._handles: dict[str, RequestHandle] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._health: list[Any] = []
        self._health_ready = threading.Condition(self._lock)
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name=f"{name}-reader", daemon=True)
        self._reader.start()

    @property
    def version(self) -> int:
        """The last version sent; ``health()["version"]`` is the one the child has applied."""
        return self._version

    def submit(
        self, prompt_ids: Any, params: SamplingParams, request_id: str | None = None
    ) -> RequestHandle:
        """As `GenerationServer.submit`: a bad request gets a handle whose ``result()`` raises."""
        rid = request_id if request_id is not None else f"{self.name}-{next(self._ids)}"
        handle = RequestHandle(rid)
        try:  # floats are refused here, never truncated; the child checks the rest
            prompt = list(prompt_token_ids(prompt_ids))
        except InvalidRequestError as e:
            handle._future.set_exception(e)
            return handle
        with self._lock:
            self._handles[rid] = handle
            self._send(("submit", rid, prompt, params))
        return handle

    def update_weights(self, params: Any, version: int, *, wait: bool = False) -> None:
        """Send a host copy of ``params``; the child applies it between decode chunks."""
        host = jax.device_get(params)
        with self._lock:
            self._send(("weights", host, version))
        self._version = version

    def _send(self, message: tuple) -> None:
        """Send to the child; a dead child is one clear error, not a bare broken pipe."""
        try:
            self._conn.send(message)
        except (BrokenPipeError, EOFError, OSError) as e:
            self._process.join(1)
            raise RuntimeError(
                f"generation process {self.name!r} (pid {self._process.pid}) is gone "
                f"(exit code {self._process.exitcode}); the run cannot continue"
            ) from e

    def health(self) -> dict[str, Any]:
        with self._lock:
            self._send(("health",))
            self._health_ready.wait_for(lambda: self._health or self._closed.is_set(), 30)
            return self._health.pop() if self._health else {"alive": False}

    def close(self) -> None:
        if not self._closed.is_set():
            # A child that already died has closed its end: nothing to tell it.
            with self._lock, contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send(("close",))
            self._reader.join(30)
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()

    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "done":
                    _, rid, output, error = message
                    with self._lock:
                        handle = self._handles.pop(rid)
                    if error is not None:
                        handle._future.set_exception(error)
                    else:
                        handle._future.set_result(output)
                elif message[0] == "health":
                    with self._lock:
                        self._health.append(message[1])
                        self._health_ready.notify_all()
                elif message[0] == "closed":
                    return
        except (EOFError, OSError):
            pass
        finally:
            self._closed.set()
            with self._lock:
                self._health_ready.notify_all()
                pending, self._handles = list(self._handles.values()), {}
            for handle in pending:  # the child is gone: fail its requests, never hang on them
                if not handle.done():
                    handle._future.set_exception(
                        RuntimeError(f"generation process {self.name!r} ended before the request")
                    )
