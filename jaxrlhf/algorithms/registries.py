"""Registries through which a config selects algorithm pieces by name.

``algorithm.policy_loss`` -> `POLICY_LOSSES`, ``algorithm.advantage_estimator`` ->
`ADVANTAGE_ESTIMATORS`, KL estimator names -> `KL_ESTIMATORS`, loss aggregation modes ->
`LOSS_AGGREGATIONS`. Importing `jaxrlhf.algorithms` fills them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxrlhf.registry import Registry

POLICY_LOSSES: Registry[Callable[..., Any]] = Registry("policy loss")
ADVANTAGE_ESTIMATORS: Registry[Callable[..., Any]] = Registry("advantage estimator")
KL_ESTIMATORS: Registry[Callable[..., Any]] = Registry("KL estimator")
LOSS_AGGREGATIONS: Registry[Callable[..., Any]] = Registry("loss aggregation")
