"""The reward registry and the loader for custom reward functions given as dotted paths."""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import math
from collections.abc import Callable
from typing import Any, Protocol

from jaxrlhf.errors import ConfigError
from jaxrlhf.registry import Registry, RegistryError

_SIGNATURE = "fn(response, answer, *, prompt=None, metadata=None) -> float"


class RewardFn(Protocol):
    """The normalised reward signature that :func:`get_reward_fn` returns."""

    def __call__(
        self,
        response: str,
        answer: str,
        *,
        prompt: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> float: ...


class RewardLoadError(ConfigError):
    """A custom reward function path that cannot be imported or called; one sentence."""


REWARDS: Registry[Callable[..., float]] = Registry("reward function")


def get_reward_fn(name_or_fn: str | Callable[..., Any]) -> RewardFn:
    """Resolve a registered name, a ``"package.module:function"`` path, or a callable.

    The result always takes ``(response, answer, *, prompt=None, metadata=None)`` and returns a
    finite float (anything else, a numeric string included, raises TypeError / ValueError);
    ``prompt`` / ``metadata`` are passed on only to functions that declare them (or
    ``**kwargs``). The original spec is kept as ``fn.reward_spec`` so that worker processes can
    load the same function again.
    """
    if callable(name_or_fn):
        label = getattr(name_or_fn, "__qualname__", repr(name_or_fn))
        return _adapt(getattr(name_or_fn, "reward_spec", name_or_fn), label)
    if not isinstance(name_or_fn, str):
        raise RewardLoadError(
            f"reward function {name_or_fn!r} must be a registered name, a "
            f"'package.module:function' path or a callable, not {type(name_or_fn).__name__}."
        )
    if ":" in name_or_fn:
        return _adapt(name_or_fn, name_or_fn)
    if name_or_fn not in REWARDS:
        close = difflib.get_close_matches(name_or_fn, REWARDS.names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise RegistryError(
            f"unknown reward function {name_or_fn!r}: expected one of "
            f"{', '.join(REWARDS.names())} or a custom 'package.module:function'{hint}"
        )
    return _adapt(name_or_fn, name_or_fn)


def load_object(path: str, what: str = "reward function") -> Any:
    """Import ``"package.module:attr.sub"`` and return the attribute, with one-sentence errors."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr or ":" in attr:
        raise RewardLoadError(f"{what} path {path!r} is malformed; expected 'package.module:name'.")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or any error raised while the module runs
        raise RewardLoadError(
            f"cannot import module {module_name!r} for {what} {path!r} "
            f"({type(e).__name__}: {e}); expected a module importable from sys.path."
        ) from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RewardLoadError(
                f"module {module_name!r} has no attribute {attr!r} ({what} {path!r}); expected "
                f"a function {_SIGNATURE}."
            ) from None
    return obj


def _resolve(spec: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(spec):
        return spec
    return load_object(spec) if ":" in spec else REWARDS.get(spec)


def _adapt(spec: str | Callable[..., Any], label: str) -> RewardFn:
    fn = _resolve(spec)
    if not callable(fn):
        raise RewardLoadError(
            f"reward function {label!r} is a {type(fn).__name__}, not callable; expected a "
            f"function {_SIGNATURE}."
        )
    try:
        sig: inspect.Signature | None = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature; trust them
        sig = None
    takes_prompt = takes_metadata = False
    if sig is not None:
        try:
            sig.bind("response", "answer")
        except TypeError:
            raise RewardLoadError(
                f"reward function {label!r} has signature {sig}, which cannot be called as "
                f"fn(response, answer); expected {_SIGNATURE}."
            ) from None
        params = sig.parameters.values()
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        takes_prompt = var_kw or "prompt" in sig.parameters
        takes_metadata = var_kw or "metadata" in sig.parameters

    @functools.wraps(fn)
    def reward(
        response: str,
        answer: str,
        *,
        prompt: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> float:
        kwargs: dict[str, Any] = {}
        if takes_prompt:
            kwargs["prompt"] = prompt
        if takes_metadata:
            kwargs["metadata"] = metadata
        value = fn(response, answer, **kwargs)
        try:
            if isinstance(value, str | bytes):
                raise TypeError
            score = float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"reward function {label!r} returned {type(value).__name__}, expected a float."
            ) from None
        if not math.isfinite(score):
            raise ValueError(
                f"reward function {label!r} returned {score}, expected a finite float."
            )
        return score

    reward.reward_spec = spec  # type: ignore[attr-defined]
    return reward
