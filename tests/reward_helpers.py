"""Custom rewards for the scoring tests, importable by reward worker processes (they inherit
``sys.path``, which holds ``tests/`` under pytest)."""

import time
from typing import Any


def by_mode(
    response: str, answer: str, *, prompt: str | None = None, metadata: dict[str, Any] | None = None
) -> Any:
    """What the row's ``mode`` column says: raise, return 1 after ``sleep_s``, return a string
    or NaN; else its ``value`` column when ``prompt`` is the row's ``echo`` column (-1 if not)."""
    assert metadata is not None
    mode = metadata["mode"]
    if mode == "raise":
        raise ValueError(f"bad row {prompt!r}")
    if mode == "hang":
        time.sleep(float(metadata["sleep_s"]))
        return 1.0  # a good score, too late
    if mode == "string":
        return "high"
    if mode == "nan":
        return float("nan")
    return float(metadata["value"]) if prompt == metadata["echo"] else -1.0
