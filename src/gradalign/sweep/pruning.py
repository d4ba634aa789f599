"""Optuna trial pruning in gradalign's sweeps: the pruner a ``hydra/sweeper/pruner`` config
describes, the storage through which a trial's job reaches its study, and the per-epoch check
that reports to the trial and asks its pruner whether to stop.

Pruning is decided inside the trial's job (train.py), where the epochs run, not in the sweep
process: after every epoch the job reports its objective so far (val loss; for
``objective=best`` the running minimum) as the trial's intermediate value at step = epoch, and
asks the pruner. The job may run in another process (joblib, submitit, a cluster), so it opens
the study from its storage: the user's ``hydra.sweeper.storage``, or, when none is given, a
journal file in the sweep directory (``JOURNAL``) that the sweeper creates for the purpose. The
sweeper passes the job where the study is (overrides ``tracking.optuna_storage``,
``tracking.optuna_study``, ``tracking.optuna_trial``), and the job builds the same pruner from
``hydra.sweeper.pruner``. Without a pruner (``hydra/sweeper/pruner=none``, the default) none of
this happens: no storage, no report, the sweep as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import optuna
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.pruners import BasePruner, NopPruner
from optuna.samplers import RandomSampler
from optuna.trial import Trial

from gradalign.hydra_compat import trusted
from gradalign.training import History

# In the sweep directory: the study of a pruned sweep without a storage.
JOURNAL = "optuna-journal.log"


def build_pruner(node: Mapping[str, Any] | None) -> BasePruner:
    """The pruner a ``hydra.sweeper.pruner`` config describes (``NopPruner`` for none); raise
    ValueError naming the bad setting and what Optuna allows."""
    if node is None:
        return NopPruner()
    spec = (
        OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    )
    target = spec.get("_target_")
    try:
        cls = get_class(str(target))
    except Exception:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, BasePruner)):
        raise ValueError(
            f"invalid config value hydra.sweeper.pruner._target_={target!r}: must name an "
            "optuna.pruners class (hydra/sweeper/pruner=none|median|percentile|"
            "successive_halving|hyperband)"
        )
    try:
        return instantiate(spec, _convert_="all", **trusted())
    except Exception as error:
        cause = error.__cause__ or error
        arguments = {k: v for k, v in spec.items() if k != "_target_"}
        raise ValueError(
            f"invalid hydra.sweeper.pruner for {cls.__name__} {arguments}: {cause}"
        ) from None


def prunes(pruner: BasePruner) -> bool:
    """Whether ``pruner`` can stop a trial (every pruner but ``NopPruner``)."""
    return not isinstance(pruner, NopPruner)


@dataclasses.dataclass
class EpochPruning:
    """A fit's ``should_stop`` for a pruned sweep's trial: report the objective of the history
    so far at step = its last epoch, and stop when the trial's pruner says so."""

    trial: Trial
    objective: str

    def __call__(self, history: History) -> bool:
        self.trial.report(history.objective(self.objective), history.epochs[-1].epoch)
        return self.trial.should_prune()


def trial_pruning(cfg: DictConfig, sweeper: DictConfig) -> Callable[[History], bool] | None:
    """The ``should_stop`` of a sweep trial's job (``cfg``: its config; ``sweeper``: the
    sweep's ``hydra.sweeper``), or None when its sweep does not prune. The job reports to its
    trial, RUNNING in the sweep, through the study's storage (a database URL or a journal file:
    gradalign.optuna_storage.open_storage), and its study judges it with the sweep's pruner."""
    tracking = cfg.tracking
    if tracking.optuna_storage is None:
        return None
    pruner = build_pruner(OmegaConf.select(sweeper, "pruner"))
    if not prunes(pruner):
        return None
    from gradalign.optuna_storage import open_storage  # a pruned trial's job only

    storage = open_storage(tracking.optuna_storage, tracking.store_wait_s)
    study_id = storage.get_study_id_from_name(tracking.optuna_study)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, tracking.optuna_trial)
    # The sampler of the job's copy of the study is never used: the sweep process samples.
    study = optuna.load_study(
        study_name=tracking.optuna_study, storage=storage, pruner=pruner, sampler=RandomSampler()
    )
    return EpochPruning(Trial(study, trial_id), cfg.objective)
