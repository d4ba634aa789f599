"""What a sweep's own settings must be, checked before the sweep imports torch, MLflow or the
rest of Optuna: a bad ``hydra.sweeper.*`` value, storage URL or search space is refused in about
the time a bad single-run value is (the plugin shim, hydra_plugins.gradalign_sweeper, calls
``check_sweep`` before it builds the sweep).

What needs the heavy imports is checked by the sweep itself, before its first trial
(gradalign.sweep.checks: every end of every searched range builds; the stores open).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gradalign.checks import is_int, is_number
from gradalign.config import ConfigError, anchored_uri, check_driver, store_form, validate
from gradalign.credentials import mask

# The sweep's one line when it refuses to start (exit status 2).
NOT_STARTED = "sweep not started, no trial run"
DIRECTIONS = ("minimize", "maximize")
STORAGES = "sqlite:///<file>, postgresql://..., mysql://..."
SQLITE = "sqlite:///"
_MISSING = object()


def check_sweep(settings: Mapping[str, Any], cfg: DictConfig, arguments: Sequence[str]) -> None:
    """Raise ConfigError naming the first bad setting of a sweep: its ``hydra.sweeper``
    ``settings`` (direction, n_trials, n_jobs, max_failure_rate, storage, study_name), its config
    ``cfg`` (gradalign.config.validate), or its search space (``hydra.sweeper.params`` and the
    command line's ``arguments``: Optuna must be able to sample each, and each key must exist)."""
    validate(cfg)  # first: a sweep setting may be the config's (n_jobs: parallel.workers)
    if settings.get("search_space") is not None:
        raise ConfigError(
            "hydra.sweeper.search_space is not supported (hydra-optuna-sweeper deprecated it): "
            "write the search space as hydra.sweeper.params"
        )
    direction = direction_name(settings.get("direction"))
    if not isinstance(direction, str) or direction not in DIRECTIONS:
        if OmegaConf.is_config(direction):  # a list of directions, shown as written
            direction = OmegaConf.to_container(direction)
        raise ConfigError(
            f"invalid config value hydra.sweeper.direction={direction!r}: must be one "
            f"of {list(DIRECTIONS)} (a trial has one objective)"
        )
    for key in ("n_trials", "n_jobs"):
        value = settings.get(key)
        if not (is_int(value) and value >= 1):
            raise ConfigError(
                f"invalid config value hydra.sweeper.{key}={value!r}: must be an integer >= 1"
            )
    rate = settings.get("max_failure_rate")
    if not (is_number(rate) and 0.0 <= rate <= 1.0):
        raise ConfigError(
            f"invalid config value hydra.sweeper.max_failure_rate={rate!r}: must be a number in "
            "[0, 1]"
        )
    _check_storage(settings.get("storage"), settings.get("study_name"), cfg.paths.root)
    check_search_keys(cfg, search_overrides(settings.get("params"), arguments))


def direction_name(direction: Any) -> Any:
    """A direction as its name: hydra-optuna-sweeper's schema gives an Enum."""
    return getattr(direction, "name", direction)


def _check_storage(storage: Any, study_name: Any, root: str) -> None:
    """A storage is null (the study in memory) or a database URL whose driver is installed (a
    SQLite file's directory exists; a relative path is taken from ``root``), and has a study
    name to be stored and resumed under."""
    if study_name is not None and not (isinstance(study_name, str) and study_name.strip()):
        raise ConfigError(
            f"invalid config value hydra.sweeper.study_name={study_name!r}: must be a name (the "
            "study is stored and resumed under it), or null without a storage"
        )
    if storage is None:
        return
    if not isinstance(storage, str) or store_form(storage) in (None, "http"):
        raise ConfigError(
            f"invalid config value hydra.sweeper.storage={mask(str(storage))!r}: must be null "
            f"(the study in memory) or a database URL: {STORAGES}"
        )
    check_driver("hydra.sweeper.storage", storage)
    check_storage_dir(anchored_uri(storage, root))
    if study_name is None:
        raise ConfigError(
            f"hydra.sweeper.storage={mask(storage)} needs hydra.sweeper.study_name: the name the "
            "study is stored and resumed under"
        )


def check_storage_dir(url: str) -> None:
    """Raise ConfigError if the SQLite storage ``url`` (its path anchored) names a file in a
    directory that does not exist: a mistyped path is an error, never a new empty study."""
    if not url.startswith(SQLITE):
        return
    path = Path(url[len(SQLITE) :])
    if not path.parent.is_dir():
        raise ConfigError(
            f"hydra.sweeper.storage={url}: directory {path.parent} does not exist (a relative "
            "path is taken from the repository root); create it or fix the path"
        )


def search_overrides(params: Mapping[str, Any] | None, arguments: Sequence[str]) -> list[str]:
    """The sweep's search space as ``key=value`` overrides: ``hydra.sweeper.params``, then the
    command line's (a later key replaces an earlier one)."""
    return [*(f"{key!s}={value}" for key, value in (params or {}).items()), *arguments]


def own_key(cfg: DictConfig, key: str) -> bool:
    """Whether a sweep sets ``key`` in ``cfg`` itself: False for appended (+) or deleted (~)
    keys, Hydra's settings and config group choices (``model=cnn``, ``experiment=seed_note``:
    composed, not set), which need no check."""
    group = Path(cfg.paths.root) / "conf" / key.replace(".", "/")
    return not key.startswith(("+", "~", "hydra.")) and not group.is_dir()


def check_search_keys(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Raise ConfigError if Optuna cannot sample a searched key of ``overrides`` (an empty
    range, a log scale from 0), or if a searched or fixed key is not in ``cfg``, naming the
    key and what it has."""
    from gradalign.sweep.search_space import parse  # Optuna's distributions (no storage, no torch)

    try:
        space = parse(overrides)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    for key in [*space.distributions, *space.fixed]:
        if own_key(cfg, key) and OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            parent = key.rpartition(".")[0]  # the deepest node of the key that exists
            while parent and not isinstance(OmegaConf.select(cfg, parent), DictConfig):
                parent = parent.rpartition(".")[0]
            node = OmegaConf.select(cfg, parent) if parent else cfg
            known = sorted(k for k in node if k != "hydra")
            where = f"{parent!r} has" if parent else "top-level keys are"
            raise ConfigError(
                f"search space key {key!r} (hydra.sweeper.params or a sweep override) is not in "
                f"the config: {where} {known}"
            )
