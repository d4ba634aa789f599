"""What a sweep checks before its first trial: that a trial of its config can start, and that
every searched (or fixed) key exists and every end of every searched range builds, so that a
typo fails once, in a second, instead of once per trial."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution

from gradalign.components import build_dataset, build_model, build_optimizer
from gradalign.config import validate
from gradalign.data import Splits

_MISSING = object()


def _range_ends(distribution: BaseDistribution) -> list[Any]:
    """The values a distribution can produce at its extremes (both ends of a range, which
    current Optuna includes; all choices of a categorical)."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]


def _own_key(key: str, cfg: DictConfig) -> bool:
    """False for appended (+) or deleted (~) keys, Hydra's settings and config group choices
    (``model=cnn``, ``experiment=seed_note``: composed, not set), which need no check."""
    group = Path(cfg.paths.root) / "conf" / key.replace(".", "/")
    return not key.startswith(("+", "~", "hydra.")) and not group.is_dir()


def check_trial_config(cfg: DictConfig, splits: Splits) -> None:
    """Raise ValueError (a ConfigError) unless a trial of ``cfg`` can start: its config
    validates and its model and optimizer accept their arguments (built on ``splits``' shape)."""
    validate(cfg)
    build_optimizer(cfg, build_model(cfg, splits).parameters())


def check_search_space(
    cfg: DictConfig,
    distributions: dict[str, BaseDistribution],
    fixed: Iterable[str],
    splits: Splits,
) -> None:
    """Raise ValueError if a searched (or ``fixed``) key is not in ``cfg``, or if a value at the
    end of a searched range cannot run (``check_trial_config``; a data set key rebuilds the
    data set), naming the key, the range and what is allowed."""
    for key in [k for k in (*distributions, *fixed) if _own_key(k, cfg)]:
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            parent = key.rpartition(".")[0]  # the deepest node of the key that exists
            while parent and not isinstance(OmegaConf.select(cfg, parent), DictConfig):
                parent = parent.rpartition(".")[0]
            node = OmegaConf.select(cfg, parent) if parent else cfg
            known = sorted(k for k in node if k != "hydra")
            where = f"{parent!r} has" if parent else "top-level keys are"
            raise ValueError(
                f"search space key {key!r} (hydra.sweeper.params or a sweep override) is not in "
                f"the config: {where} {known}"
            )
    for key, distribution in distributions.items():
        if not _own_key(key, cfg) or isinstance(OmegaConf.select(cfg, key), DictConfig):
            continue  # a config group choice (model=mlp,cnn) composes its own values
        for value in _range_ends(distribution):
            trial_cfg = copy.deepcopy(cfg)
            OmegaConf.update(trial_cfg, key, value, force_add=False)
            try:
                trial_splits = build_dataset(trial_cfg) if key.startswith("dataset.") else splits
                check_trial_config(trial_cfg, trial_splits)
            except ValueError as error:
                raise ValueError(
                    f"search space of {key} ({distribution}) reaches {value!r}: {error}"
                ) from None
