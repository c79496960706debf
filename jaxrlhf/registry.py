"""One registry pattern for everything selected by name from a config.

Losses, advantage estimators, KL estimators, rewards and MFC interfaces are all
registered the same way::

    ADVANTAGES = Registry("advantage estimator")

    @ADVANTAGES.register("gae")
    def gae(...): ...

    fn = ADVANTAGES.get(cfg.algorithm.advantage_estimator)

An entry may carry metadata (keyword arguments of ``register``) that the rest of the system asks
instead of keeping its own table of names, e.g. ``register("gae", needs_values=True)`` and
``ADVANTAGES.info("gae")["needs_values"]``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown or duplicate name; the message is one sentence for the user."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A named mapping from strings to objects, with helpful errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._info: dict[str, Mapping[str, Any]] = {}

    def register(self, name: str, obj: T | None = None, **info: Any) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name`` with metadata ``info``; a decorator when ``obj`` is
        omitted."""

        def add(o: T) -> T:
            if name in self._items and self._items[name] is not o:
                raise RegistryError(f"{self.kind} {name!r} is already registered.")
            self._items[name] = o
            self._info[name] = MappingProxyType(dict(info))
            return o

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a temporary entry clean up with this)."""
        self.get(name)
        del self._items[name], self._info[name]

    def get(self, name: str) -> T:
        """Return the object registered as ``name`` or raise naming the closest valid name."""
        self.check(name)
        return self._items[name]

    def info(self, name: str) -> Mapping[str, Any]:
        """The metadata ``name`` was registered with (read-only)."""
        self.check(name)
        return self._info[name]

    def check(self, name: str, key: str | None = None) -> None:
        """Raise `RegistryError` unless ``name`` is registered; ``key`` (a config key) is named
        in the sentence, e.g. ``algorithm.policy_loss='ppx' is not a known policy loss``."""
        if name in self._items:
            return
        close = difflib.get_close_matches(str(name), list(self._items), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        known = ", ".join(sorted(self._items)) or "none"
        what = (
            f"{key}={name!r} is not a known {self.kind}" if key else f"unknown {self.kind} {name!r}"
        )
        raise RegistryError(f"{what} (known: {known}){hint}")

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
