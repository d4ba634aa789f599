"""The pipeline's reading of a composed Hydra config: the repo-root resolver, early validation,
flattening into MLflow params, and the config hash that identifies equivalent runs.

Validation happens here, before any data, training or MLflow run exists, so that a typo on the
command line fails in milliseconds with a message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Keys that say where and how things run, not what is computed: never logged as params nor hashed.
NOT_PARAMS = ("paths", "tracking", "parallel")
# Also left out of the config hash: seeds (the report matches them separately) and execution
# settings that do not change what a run computes.
NOT_HASHED = (*NOT_PARAMS, "seed", "trainer.device", "trainer.threads")


def register_resolvers(repo_root: str | Path) -> None:
    """Register ``${repo_root:}``, which conf/config.yaml uses to anchor outputs, data and MLflow,
    and ``${cpu_count:}``, the cores this process may run on (the parallel presets' default
    number of workers).

    Entry points call this with their own directory, so paths do not depend on the working
    directory nor on Hydra's run directory.
    """
    root = str(Path(repo_root).resolve())
    OmegaConf.register_new_resolver("repo_root", lambda: root, replace=True)
    OmegaConf.register_new_resolver("cpu_count", lambda: len(os.sched_getaffinity(0)), replace=True)


def is_number(value: Any) -> bool:
    """A real number (a bool is not one, though Python says it is)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    """An integer (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


# (key, check, what is allowed); a rule applies when its key is present in the config.
_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("optimizer.lr", lambda v: is_number(v) and v > 0, "a number > 0"),
    ("optimizer.beta", lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("trainer.epochs", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    ("trainer.batch_size", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    ("trainer.device", lambda v: v in ("auto", "cpu", "cuda"), "one of auto, cpu, cuda"),
    ("trainer.threads", lambda v: v is None or (is_int(v) and v >= 1), "null or an integer >= 1"),
    ("seed.model", is_int, "an integer"),
    ("seed.data", is_int, "an integer"),
    ("objective", lambda v: v in ("last", "best"), "one of last, best"),
    ("dataset.val_fraction", lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    ("tracking.flush_interval_s", lambda v: is_number(v) and v >= 0, "a number >= 0"),
    (
        "tracking.optuna_trial",
        lambda v: v is None or (is_int(v) and v >= 0),
        "null or an int >= 0",
    ),
    ("parallel.workers", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
)
_ABSENT = object()


def hydra_quoted(path: Path) -> str:
    """``path`` as a quoted value of a Hydra override (a comma, a space or a bracket in it
    would otherwise make a sweep over several values or a parse error)."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def validate(cfg: DictConfig) -> None:
    """Raise ValueError on the first invalid setting, naming key, value and what is allowed."""
    for key, check, allowed in _RULES:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not check(value):
            raise ValueError(f"invalid config value {key}={value!r}: must be {allowed}")


def flatten(cfg: DictConfig, exclude: Iterable[str] = NOT_PARAMS) -> dict[str, Any]:
    """The resolved config as {dotted key: leaf value}, without the subtrees named in ``exclude``.

    Lists are leaves (``model.hidden`` -> [100, 100]); empty mappings are dropped.
    """
    excluded = set(exclude)
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if dotted in excluded:
                continue
            if isinstance(value, dict):
                walk(value, f"{dotted}.")
            else:
                flat[dotted] = value

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def config_hash(cfg: DictConfig) -> str:
    """12 hex digits identifying what a run computes, independent of seeds, paths and tracking."""
    canonical = json.dumps(flatten(cfg, NOT_HASHED), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
