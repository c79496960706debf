"""What ends a run early without losing it: stop signals, bad steps, a state that is not finite.

- `StopSignals`: while a run loop trains, the first SIGINT, SIGTERM (what Slurm, Kubernetes and
  a preempted TPU / cloud VM send before killing) or SIGUSR1 (Slurm's ``--signal=USR1@T``) only
  records a stop request, which the loop acts on after the current step (save, then stop). Once
  a stop is requested a SIGINT ends the process at once (the OS default action, so even a step
  stuck in device code cannot hold it), and a repeated SIGTERM / SIGUSR1 is ignored (a
  scheduler's second notice must not cut the save short).
- `BadSteps`: counts consecutive steps whose metrics hold a non-finite value or a skipped
  non-finite update (``*/nonfinite_skipped`` > 0); the loop stops at ``algorithm.max_bad_steps``.
- `nonfinite_leaves`: the paths of a state tree's float leaves that hold NaN or inf (one jitted
  reduction), checked before every save so a checkpoint is never written from a broken state.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxrlhf import hostio

# The signals that ask a run to save and stop (exit status 128 + the signal's number).
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def _say(text: str) -> None:
    """One line on stderr from a signal handler (``os.write``: a handler may run while the main
    thread is inside ``print`` on the same stream, and a second ``print`` would fail)."""
    with contextlib.suppress(OSError):
        os.write(2, f"jaxrlhf: {text}\n".encode())


class StopSignals:
    """Context manager: record the first stop signal in ``received`` instead of dying on it
    (module docstring). Installs nothing off the main thread, where Python cannot take signals;
    the previous handlers come back on exit."""

    def __init__(self, *, announce: bool = True) -> None:
        self.announce = announce
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        if self.received is not None:
            if self.announce:
                _say(f"{sig.name} received again: already stopping after this step")
            return
        self.received = sig
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # from now on Ctrl-C aborts at once
        if self.announce:
            _say(
                f"{sig.name} received: saving a checkpoint after this step, then stopping "
                "(Ctrl-C again aborts at once without saving)"
            )


class BadSteps:
    """Consecutive bad steps: a metric that is not finite, or an update skipped because its loss
    or gradient was not (``*nonfinite_skipped`` > 0). ``first`` names the first of the current
    streak, as (step, metric, value)."""

    SKIPPED_SUFFIX = "nonfinite_skipped"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.first: tuple[int, str, float] | None = None

    @classmethod
    def bad_metric(cls, metrics: Mapping[str, float | int]) -> tuple[str, float] | None:
        """The first non-finite metric (else the first skipped-update flag) of one step."""
        skipped = None
        for key, value in metrics.items():
            if isinstance(value, float) and not math.isfinite(value):
                return key, value
            if skipped is None and key.endswith(cls.SKIPPED_SUFFIX) and value > 0:
                skipped = key, value
        return skipped

    def update(self, step: int, metrics: Mapping[str, float | int]) -> int:
        """Count step ``step`` (host metrics); returns the current streak's length."""
        bad = self.bad_metric(metrics)
        if bad is None:
            self.count, self.first = 0, None
        else:
            self.count += 1
            if self.first is None:
                self.first = (step, *bad)
        return self.count

    @property
    def exhausted(self) -> bool:
        return self.count >= self.limit

    def describe(self) -> str:
        """The streak's first bad step for the user, e.g. ``step 5: actor/loss = nan``."""
        if self.first is None:
            return "no bad step"
        step, key, value = self.first
        if key.endswith(self.SKIPPED_SUFFIX):
            return f"step {step}: {key} = {value:g} (a non-finite loss or gradient; update skipped)"
        return f"step {step}: {key} = {value}"

    def state(self) -> dict[str, Any]:
        """JSON-able, for a checkpoint's host state (a resumed run continues the streak)."""
        return {"count": self.count, "first": None if self.first is None else list(self.first)}

    def load(self, state: Mapping[str, Any] | None) -> None:
        """Adopt a `state` (None: a checkpoint from before this counter: no streak)."""
        state = state or {}
        self.count = int(state.get("count", 0))
        first = state.get("first")
        self.first = None if first is None else (int(first[0]), str(first[1]), float(first[2]))


@jax.jit
def _leaves_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(tree: Any) -> list[str]:
    """Paths (``jax.tree_util.keystr``) of the float leaves of ``tree`` holding NaN or inf.

    One jitted reduction and one small transfer; every process of a multi-process run must call
    it together (the leaves are global arrays).
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    floats = [(path, x) for path, x in flat if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not floats:
        return []
    ok = hostio.fetch(_leaves_finite([x for _, x in floats]))
    return [
        jax.tree_util.keystr(path) for (path, _), fine in zip(floats, ok, strict=True) if not fine
    ]
