"""One registry pattern for everything selected by name from a config.

Losses, advantage estimators, KL estimators, rewards and MFC interfaces are all
registered the same way::

    ADVANTAGES = Registry("advantage estimator")

    @ADVANTAGES.register("gae")
    def gae(...): ...

    fn = ADVANTAGES.get(cfg.algorithm.advantage_estimator)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

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

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""

        def add(o: T) -> T:
            if name in self._items and self._items[name] is not o:
                raise RegistryError(f"{self.kind} {name!r} is already registered.")
            self._items[name] = o
            return o

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        """Return the object registered as ``name`` or raise naming the closest valid name."""
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            known = ", ".join(sorted(self._items)) or "none"
            raise RegistryError(f"unknown {self.kind} {name!r} (known: {known}){hint}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
