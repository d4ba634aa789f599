"""What a sweep checks before its first trial, once torch is imported: that a trial of its
config can start, and that every end of every searched range builds, so that a bad value fails
once, in seconds, instead of once per trial. (Its settings, and that every searched key exists,
are checked before: gradalign.sweep.settings.)"""

from __future__ import annotations

import copy

from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution

from gradalign.components import build_dataset, build_model, build_optimizer, build_scheduler
from gradalign.config import validate
from gradalign.data import Splits
from gradalign.experiment import resolve_device
from gradalign.sweep.settings import own_key


def check_trial_config(cfg: DictConfig, splits: Splits) -> None:
    """Raise ValueError (a ConfigError) unless a trial of ``cfg`` can start: its config
    validates and its model, optimizer and lr scheduler accept their arguments (built on
    ``splits``' shape)."""
    validate(cfg)
    resolve_device(cfg.trainer.device)
    build_scheduler(cfg, build_optimizer(cfg, build_model(cfg, splits).parameters()))


def check_search_space(
    cfg: DictConfig,
    distributions: dict[str, BaseDistribution],
    splits: Splits,
) -> None:
    """Raise ValueError if a value at the end of a searched range cannot run
    (``check_trial_config``; a data set key rebuilds the data set), naming the key, the range
    and what is allowed. (That every searched or ``fixed`` key exists is checked before:
    gradalign.sweep.settings.check_search_keys.)"""
    for key, distribution in distributions.items():
        if not own_key(cfg, key) or isinstance(OmegaConf.select(cfg, key), DictConfig):
            continue  # a config group choice (model=mlp,cnn) composes its own values
        # the values it can produce at its extremes: both ends of a range (which current
        # Optuna includes), every choice of a categorical
        if isinstance(distribution, CategoricalDistribution):
            ends = list(distribution.choices)
        else:
            ends = [distribution.low, distribution.high]
        for value in ends:
            trial_cfg = copy.deepcopy(cfg)
            OmegaConf.update(trial_cfg, key, value, force_add=False)
            try:
                trial_splits = build_dataset(trial_cfg) if key.startswith("dataset.") else splits
                check_trial_config(trial_cfg, trial_splits)
            except ValueError as error:
                raise ValueError(
                    f"search space of {key} ({distribution}) reaches {value!r}: {error}"
                ) from None
