"""Errors a user causes and can fix (a bad config, a bad dataset): the ground floor, so every
layer may raise them and the launcher layer (``jaxrlhf.cli.main_guard``) turns them into one line
on stderr instead of a traceback."""

from __future__ import annotations

from jaxrlhf.registry import RegistryError

__all__ = ["USER_ERRORS", "ConfigError", "DataError", "RegistryError"]


class ConfigError(ValueError):
    """A bad config file, key, value or override; the message is one sentence for the user."""


class DataError(ValueError):
    """A dataset that cannot be read or a bad row in strict mode; one sentence for the user."""


# What a launcher reports as one line (an unknown registry name picked in a config included).
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, RegistryError, DataError)
