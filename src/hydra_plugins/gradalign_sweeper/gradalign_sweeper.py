"""The Hydra sweeper of ``python train.py -m``: hydra-optuna-sweeper's OptunaSweeper with
gradalign's safeguards (gradalign.sweep). Configured by conf/hydra/sweeper/optuna_tpe.yaml.

Hydra imports every module under ``hydra_plugins`` at start-up to find plugins, so this one
imports the implementation (Optuna, MLflow, torch) only when the sweeper is built.
"""

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class GradalignOptunaSweeper(Sweeper):
    """Takes the arguments of hydra-optuna-sweeper's OptunaSweeper (its structured config)."""

    def __init__(self, **kwargs: Any) -> None:
        from gradalign.sweep.sweeper import SafeOptunaSweeperImpl

        self.sweeper = SafeOptunaSweeperImpl(**kwargs)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
