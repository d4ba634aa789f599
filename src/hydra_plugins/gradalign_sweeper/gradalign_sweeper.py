"""The Hydra sweeper of ``python train.py -m``: gradalign's own Optuna loop
(gradalign.sweep.sweeper) behind hydra-optuna-sweeper's settings. Configured by
conf/hydra/sweeper/gradalign.yaml.

Hydra imports every module under ``hydra_plugins`` at start-up to find plugins, in every Hydra
app of the environment. So this one imports the implementation (Optuna, MLflow, torch) only when
the sweeper is built, and registers its config only when hydra-optuna-sweeper, whose settings
and sampler choices it takes, is installed: without it (the optimizer installed alone, beside
some other Hydra app) it stays silent. Its config schema is hydra-optuna-sweeper's plus a
``seed`` for whichever sampler is chosen and a ``pruner`` (``hydra/sweeper/pruner=...``,
conf/hydra/sweeper/pruner/), and it is built non-recursively: the sweeper, not Hydra, builds the
sampler, so that every ``hydra/sweeper/sampler=...`` choice works with the installed Optuna, and
the pruner, so that a bad pruner setting is one line.
"""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction

try:
    from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
except ImportError:  # the study's dependencies are not installed: nothing to register
    OptunaSweeperConf = None

if OptunaSweeperConf is not None:

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
    """Takes the settings of GradalignOptunaSweeperConf (gradalign.sweep.sweeper.OptunaSweep).
    The settings, the config and the search space are checked first
    (gradalign.sweep.settings.check_sweep): a bad one is refused in one line, exit status 2,
    before the sweep is built (its imports take seconds) and before its directory is made."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: Any
    ) -> None:
        self.context = {
            "hydra_context": hydra_context,
            "task_function": task_function,
            "config": config,
        }

    def sweep(self, arguments: list[str]) -> None:
        import sys

        from gradalign.config import ConfigError
        from gradalign.credentials import mask
        from gradalign.sweep.settings import NOT_STARTED, check_sweep

        try:
            check_sweep(self.settings, self.context["config"], arguments)
        except ConfigError as error:
            print(mask(f"{NOT_STARTED}: {error}"), file=sys.stderr)
            raise SystemExit(2) from None
        from gradalign.sweep.sweeper import OptunaSweep

        sweep = OptunaSweep(**self.settings)
        sweep.setup(**self.context)
        return sweep.sweep(arguments)
