"""The Hydra sweeper of ``python train.py -m``: hydra-optuna-sweeper's OptunaSweeper with
gradalign's safeguards (gradalign.sweep.sweeper). Configured by conf/hydra/sweeper/gradalign.yaml.

Hydra imports every module under ``hydra_plugins`` at start-up to find plugins, so this one
imports the implementation (Optuna, MLflow, torch) only when the sweeper is built. Its config
schema is the stock sweeper's plus a ``seed`` for whichever sampler is chosen and a ``pruner``
(``hydra/sweeper/pruner=...``, conf/hydra/sweeper/pruner/), and it is built non-recursively:
the sweeper, not Hydra, builds the sampler, so that every ``hydra/sweeper/sampler=...`` choice
works with the installed Optuna, and the pruner, so that a bad pruner setting is one line.
"""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import DictConfig


@dataclass
class GradalignOptunaSweeperConf(OptunaSweeperConf):
    """OptunaSweeperConf, plus ``seed`` (the sampler's unless its own config sets one) and
    ``pruner`` (an ``optuna.pruners`` class and its arguments; null: none)."""

    _target_: str = "hydra_plugins.gradalign_sweeper.gradalign_sweeper.GradalignOptunaSweeper"
    _recursive_: bool = False
    seed: int | None = None
    pruner: Any = None


ConfigStore.instance().store(
    group="hydra/sweeper",
    name="gradalign_optuna_schema",
    node=GradalignOptunaSweeperConf,
    provider="gradalign",
)


class GradalignOptunaSweeper(Sweeper):
    """Takes the arguments of GradalignOptunaSweeperConf."""

    def __init__(self, *, sampler: DictConfig, seed: int | None, **kwargs: Any) -> None:
        # kwargs: the stock sweeper's arguments and ``pruner``, which SafeOptunaSweeperImpl
        # builds (and checks) when the sweep starts
        from gradalign.sweep.sampler import build_sampler
        from gradalign.sweep.sweeper import SafeOptunaSweeperImpl

        self.sweeper = SafeOptunaSweeperImpl(sampler=build_sampler(sampler, seed), **kwargs)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
