"""Errors a user causes and can fix (a bad config, a bad dataset): the ground floor, so every
layer may raise them and the launcher layer (``jaxrlhf.cli.main_guard``) turns them into one line
on stderr instead of a traceback.

A layer's own user errors subclass these two, so the launcher needs no list of them:
`ConfigError` for what a config names (``mesh.*``: ``MeshError``; ``reward.fn``:
``RewardLoadError``; a model directory's ``config.json``: ``ModelConfigError``), `DataError`
for files read as input (weights: ``models.safetensors_io.CheckpointError``; a train
checkpoint with no intact step, or a save the disk refused: ``checkpoint.CheckpointIOError``)."""

from __future__ import annotations

from jaxrlhf.registry import RegistryError

__all__ = [
    "USER_ERRORS",
    "ConfigError",
    "DataError",
    "DivergedError",
    "RegistryError",
    "RunStopped",
]


class ConfigError(ValueError):
    """A bad config file, key, value or override; the message is one sentence for the user."""


class DataError(ValueError):
    """A dataset that cannot be read or a bad row in strict mode; one sentence for the user."""


# What a launcher reports as one line (an unknown registry name picked in a config included).
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, RegistryError, DataError)


class RunStopped(Exception):
    """The run ended before its last step for a reason that is no bug (a stop signal, training
    that diverged): ``str(err)`` is one line for the user, ``exit_code`` the launcher's exit
    status (``jaxrlhf.cli.main_guard``)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class DivergedError(RunStopped):
    """Non-finite values stopped the run (``algorithm.max_bad_steps`` bad steps in a row, or a
    state that is not finite at a save); nothing was saved from the bad state."""

    EXIT_CODE = 3

    def __init__(self, message: str) -> None:
        super().__init__(message, self.EXIT_CODE)
