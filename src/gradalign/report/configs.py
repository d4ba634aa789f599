"""Training configs of the report, composed from conf/ as train.py composes them.

A final run is its optimizer's best sweep run with three things changed: the budget
(trainer.epochs), the seeds, and one thread per process. Everything else comes from the same
composition (``optimizer=<name>`` plus the user's overrides) with the best run's logged optimizer
params as overrides, and is checked to reproduce them exactly. The same composition defines the
*context* a sweep run must share to count: every hashed setting outside ``optimizer.*``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from gradalign.config import ConfigError, flatten, hashed, validate
from gradalign.hydra_compat import VERSION_BASE
from gradalign.schema import Param

# One thread per process: results do not depend on the core count, and parallel runs do not
# oversubscribe the cores. Placed before the user's overrides, so trainer.threads=N still wins.
DEFAULT_OVERRIDES = ("trainer.threads=1",)


def _compose(conf_dir: Path, overrides: Sequence[str], hydra: bool = False) -> DictConfig:
    """conf/config.yaml composed with ``overrides``: a copy the caller may change."""
    return copy.deepcopy(_composed(conf_dir, tuple(overrides), hydra))


@functools.cache
def _composed(conf_dir: Path, overrides: tuple[str, ...], hydra: bool) -> DictConfig:
    """Each composition once per process: a study composes the same ones for every part it
    reports, and one Hydra composition costs far more than a copy."""
    with initialize_config_dir(config_dir=str(conf_dir), **VERSION_BASE):
        try:
            return compose("config", overrides=list(overrides), return_hydra_config=hydra)
        except HydraException as error:
            raise ConfigError(
                f"invalid training-config overrides {list(overrides)}: {error}"
            ) from None


def _finish(cfg: DictConfig) -> DictConfig:
    OmegaConf.resolve(cfg)  # concrete values: the config can go to a worker process as is
    validate(cfg)
    return cfg


def compose_config(conf_dir: Path, overrides: Sequence[str]) -> DictConfig:
    """conf/config.yaml composed with ``overrides`` (no hydra node), resolved and validated."""
    return _finish(_compose(conf_dir, overrides))


@dataclasses.dataclass(frozen=True)
class Composition:
    """An optimizer's runs in the study: their overrides (its config group, then the user's),
    the composed config, and the keys its sweep searches (hydra.sweeper.params)."""

    overrides: tuple[str, ...]
    cfg: DictConfig
    searched: frozenset[str]


def optimizer_overrides(optimizer: str, overrides: Sequence[str]) -> tuple[str, ...]:
    """The overrides of ``optimizer``'s sweep and final runs: its config group, the study's
    defaults, the user's ``overrides``. The report accepts only sweeps run with these."""
    return (f"optimizer={optimizer}", *DEFAULT_OVERRIDES, *overrides)


def sweep_command(
    optimizer: str,
    overrides: Sequence[str],
    *settings: str,
    program: Sequence[str] = ("python", "train.py"),
) -> list[str]:
    """The ``train.py -m`` command of ``optimizer``'s sweep with ``overrides`` (those of
    ``optimizer_overrides``, so the report accepts its runs), and the sweeper's ``settings``:
    what the report tells a user to run, and what a study runs (with its own ``program``)."""
    return [*program, *optimizer_overrides(optimizer, overrides), *settings, "-m"]


def compose_optimizer(conf_dir: Path, optimizer: str, overrides: Sequence[str]) -> Composition:
    """The Composition of ``optimizer``'s runs with the user's ``overrides``.

    An optimizer has one name: its config file's, conf/optimizer/<name>.yaml, which its runs
    carry as ``optimizer.name`` (their tag ``optimizer``, by which the report finds them), so
    a config, or an override, that names it otherwise is refused (ConfigError).
    """
    base = optimizer_overrides(optimizer, overrides)
    cfg = _compose(conf_dir, base, hydra=True)
    if cfg.optimizer.name != optimizer:
        raise ConfigError(
            f"invalid config value optimizer.name={cfg.optimizer.name!r} for "
            f"conf/optimizer/{optimizer}.yaml: must be {optimizer!r}, its file's name (runs are "
            "tagged, and the report finds them, by that one name)"
        )
    searched = frozenset(cfg.hydra.sweeper.params or {})
    with open_dict(cfg):
        del cfg["hydra"]
    return Composition(base, _finish(cfg), searched)


def run_context(params: Mapping[str, str]) -> dict[str, str]:
    """The logged params of a run that a comparable run must share: hashed and non-optimizer."""
    return {
        k: v for k, v in params.items() if hashed(k) and not k.startswith(Param.OPTIMIZER_PREFIX)
    }


def logged_params(cfg: DictConfig) -> dict[str, str]:
    """The params a run of ``cfg`` logs, as MLflow stores them (str values)."""
    return {key: str(value) for key, value in flatten(cfg).items()}


def optimizer_params(params: Mapping[str, str]) -> dict[str, str]:
    """The ``optimizer.*`` entries of a run's logged params."""
    return {k: v for k, v in params.items() if k.startswith(Param.OPTIMIZER_PREFIX)}


def tuned_overrides(cfg: DictConfig, best: Mapping[str, str]) -> dict[str, str]:
    """The best run's optimizer params that differ from ``cfg``'s (the tuned hyperparameters).

    Raises ConfigError if the run's optimizer keys are not the config's: the optimizer's config
    changed since the sweep, so its best run cannot be reproduced.
    """
    current = optimizer_params(logged_params(cfg))
    if set(current) != set(best):
        raise ConfigError(
            f"the best sweep run of optimizer {cfg.optimizer.name!r} logged optimizer keys "
            f"{sorted(best)} but conf/optimizer/{cfg.optimizer.name}.yaml now has "
            f"{sorted(current)}: rerun its sweep: python train.py optimizer={cfg.optimizer.name} -m"
        )
    return {key: value for key, value in best.items() if current[key] != value}


def hyperparameters(composition: Composition, best: Mapping[str, str]) -> dict[str, str]:
    """The best run's values of the keys its sweep searched and of any other optimizer key that
    differs from the config file."""
    changed = tuned_overrides(composition.cfg, best)
    return {k: v for k, v in best.items() if k in composition.searched or k in changed}


def final_config(
    conf_dir: Path, composition: Composition, best: Mapping[str, str], *, epochs: int
) -> DictConfig:
    """The final-run config: ``composition`` with the best run's optimizer params ``best`` and
    ``epochs`` epochs; seeds are set by ``seeded``.

    Raises ConfigError unless the composed config logs exactly the params in ``best``.
    """
    tuned = [f"{k}={v}" for k, v in tuned_overrides(composition.cfg, best).items()]
    cfg = compose_config(conf_dir, [*composition.overrides, *tuned, f"trainer.epochs={epochs}"])
    got = optimizer_params(logged_params(cfg))
    if got != dict(best):
        diff = {k: (best.get(k), got.get(k)) for k in sorted(set(best) | set(got))}
        diff = {k: pair for k, pair in diff.items() if pair[0] != pair[1]}
        raise ConfigError(
            f"cannot reproduce the best run's params {{key: (logged, composed)}}: {diff}"
        )
    return cfg


def seeded(cfg: DictConfig, seed: int) -> DictConfig:
    """A copy of ``cfg`` with seed.model = seed.data = ``seed``: for a given seed every optimizer
    starts from the same weights and sees the same mini-batch order."""
    copy = cfg.copy()
    copy.seed.model = seed
    copy.seed.data = seed
    validate(copy)
    return copy
