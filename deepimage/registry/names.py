"""Registered model names, scoped by the experiment: <prefix>-<res>px and <prefix>-ensemble,
the prefix mlflow.registry_prefix or else the experiment's name (light: the Snakefile imports it).

    registered_name("deepimage", 64) == "deepimage-64px"; ensemble_name("deepimage") == "deepimage-ensemble"
"""
from __future__ import annotations

import re

CHAMPION = "champion"   # the alias of the best ensemble version (deepimage.registry.champion)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_prefix(prefix: str, key: str = "mlflow.registry_prefix") -> str:
    """The prefix of registered names, or ValueError naming the key."""
    if not isinstance(prefix, str) or not _NAME.match(prefix):
        raise ValueError(f"{key} {prefix!r}: registered model names start with a letter or digit and hold "
                         "only letters, digits, '.', '_' and '-': set mlflow.registry_prefix")
    return prefix


def registered_name(prefix: str, resolution: int | str) -> str:
    """One resolution's model: <prefix>-<res>px."""
    return f"{prefix}-{resolution}px"


def ensemble_name(prefix: str) -> str:
    return f"{prefix}-ensemble"
