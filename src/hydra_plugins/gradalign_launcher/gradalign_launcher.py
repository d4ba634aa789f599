"""The Hydra launcher of ``parallel=stacked``: the jobs of a batch (a sweep's trials) trained as
one stacked model in the sweep's process (gradalign.sweep.stacked_launcher). Configured by
conf/parallel/stacked.yaml.

Hydra imports every module under ``hydra_plugins`` at start-up to find plugins, so this one
imports the implementation (torch, MLflow) only when a batch is launched.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class StackedLauncherConf:
    _target_: str = "hydra_plugins.gradalign_launcher.gradalign_launcher.StackedLauncher"


ConfigStore.instance().store(
    group="hydra/launcher", name="gradalign_stacked", node=StackedLauncherConf, provider="gradalign"
)


@dataclass
class StackedLauncher(Launcher):
    """Launches each batch through ``gradalign.sweep.stacked_launcher.launch``, keeping the
    data sets it built for the next batches."""

    hydra_context: HydraContext | None = None
    config: DictConfig | None = None
    processes: dict[str, Any] = field(default_factory=dict)  # (device, splits) by data set

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        # task_function (train.py's main) is not called: its trial is split in two here
        self.hydra_context = hydra_context
        self.config = config

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from gradalign.sweep.stacked_launcher import launch

        return launch(
            self.hydra_context, self.config, job_overrides, initial_job_idx, self.processes
        )
