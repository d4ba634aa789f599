"""One sweep trial as both stores hold it: an Optuna trial and its MLflow run.

The sweep loop (gradalign.sweep.sweeper) asks the trial, creates its MLflow run (RUNNING, nested
under the sweep's parent, tagged ``optuna_trial``) and writes the run's id on the trial (user
attr ``mlflow_run_id``) before the trial's job starts: from then on each store leads to the
other. The job (``run_trial``: train.py's task in a sweep) fills that run and ends it with the
trial's outcome, and returns the outcome as a plain ``Outcome``. The loop then tells Optuna
(``record``). So MLflow always has the outcome first, and an Optuna trial left RUNNING by a
process that was killed is completed from its MLflow run (``settle``), whoever does it: a resumed
sweep, an interrupted one, or ``python -m gradalign.doctor``.

How an outcome reads in each store:

| outcome | MLflow run | Optuna trial |
|---|---|---|
| complete | FINISHED, metric ``objective`` | COMPLETE, that value |
| diverged | FAILED, tags ``diverged=true``, ``failure_reason`` | COMPLETE, value inf |
| pruned | FINISHED, tags ``pruned=true``, ``pruned_epoch`` | PRUNED |
| failed | FAILED (raised) or KILLED (interrupted), tag ``failure_reason`` | FAIL |

(A diverged trial is COMPLETE with inf so that TPE, which learns from complete trials only,
moves away from its region.)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

from omegaconf import DictConfig

from gradalign import processes
from gradalign.schema import Metric, Stage, Tag

log = logging.getLogger(__name__)

# What a trial came to (Outcome.kind), and what one still running is.
COMPLETE, DIVERGED, PRUNED, FAILED, RUNNING = "complete", "diverged", "pruned", "failed", "running"
# The user attrs a trial carries (docs/tracking.md; its owner's, ``owner``: gradalign.budget).
RUN_ID, FAILURE_REASON, DIVERGED_ATTR, PRUNED_EPOCH = (
    "mlflow_run_id",
    "failure_reason",
    "diverged",
    "pruned_epoch",
)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a trial came to: ``kind`` (complete, diverged, pruned or failed), its objective
    (complete: the value; diverged: inf; otherwise None), why it diverged or failed, and the
    last epoch a pruned one trained."""

    kind: str
    value: float | None = None
    reason: str | None = None
    pruned_epoch: int | None = None

    def attrs(self) -> dict[str, Any]:
        """The trial's user attrs that say so."""
        attrs: dict[str, Any] = {}
        if self.kind == DIVERGED:
            attrs[DIVERGED_ATTR] = True
        if self.reason is not None and self.kind in (DIVERGED, FAILED):
            attrs[FAILURE_REASON] = self.reason
        if self.pruned_epoch is not None:
            attrs[PRUNED_EPOCH] = self.pruned_epoch
        return attrs


def outcome_of_history(history: Any, objective: str) -> Outcome:
    """The outcome of a job that trained ``history`` (a ``training.History``) with objective
    rule ``objective`` (cfg.objective); the job's run ended as ``tracking.Run.finish`` says."""
    if history.diverged:
        return Outcome(DIVERGED, math.inf, history.reason or "non-finite objective")
    if history.stopped:
        return Outcome(PRUNED, pruned_epoch=history.epochs[-1].epoch)
    return Outcome(COMPLETE, history.objective(objective))


def outcome_of_run(run: Any) -> Outcome | None:
    """The outcome an MLflow run (``mlflow.entities.Run``) of a trial records; None while it is
    RUNNING."""
    status, tags = run.info.status, run.data.tags
    reason = tags.get(Tag.FAILURE_REASON)
    if status == "RUNNING":
        return None
    if status == "FINISHED":
        if tags.get(Tag.PRUNED) == "true":
            return Outcome(PRUNED, pruned_epoch=int(tags[Tag.PRUNED_EPOCH]))
        if Metric.OBJECTIVE in run.data.metrics:
            return Outcome(COMPLETE, run.data.metrics[Metric.OBJECTIVE])
        return Outcome(FAILED, reason="its MLflow run finished without an objective")
    if status == "FAILED" and tags.get(Tag.DIVERGED) == "true":
        return Outcome(DIVERGED, math.inf, reason or "non-finite objective")
    return Outcome(FAILED, reason=reason or f"its MLflow run ended {status}")


def run_trial(cfg: DictConfig) -> Outcome:
    """The job of one trial (train.py's task in a sweep): train ``cfg`` into the MLflow run the
    sweep created for it (tracking.run_id), end the run, and return the outcome."""
    processes.adopt()
    from gradalign.config import validate

    validate(cfg)  # before torch's models and MLflow are touched: a bad value answers at once
    from gradalign.experiment import run_experiment

    history, run_id = run_experiment(cfg, **trial_options(cfg))
    outcome = outcome_of_history(history, cfg.objective)
    log_outcome(cfg, outcome, run_id)
    return outcome


def trial_options(cfg: DictConfig) -> dict[str, Any]:
    """How the Hydra job running ``cfg`` (a sweep's trial) places, tags and stops its run: the
    keywords of ``experiment.run_experiment`` (stage, parent run, tags, the pruner's
    ``should_stop``)."""
    from hydra.core.hydra_config import HydraConfig

    from gradalign.sweep.pruning import trial_pruning
    from gradalign.sweep.runs import trial_tags

    hydra_cfg = HydraConfig.get()
    tags = trial_tags(cfg, hydra_cfg.sweep.dir, hydra_cfg.sweeper)
    tags[Tag.HYDRA_JOB_NUM] = str(hydra_cfg.job.num)
    return {
        "stage": Stage.SWEEP,
        "parent_run_id": cfg.tracking.parent_run_id,
        "extra_tags": tags,
        "should_stop": trial_pruning(cfg, hydra_cfg.sweeper),
    }


def log_outcome(cfg: DictConfig, outcome: Outcome, run_id: str) -> None:
    """Log the job's one line: its outcome and its run's page in the MLflow UI."""
    from gradalign import tracking

    if outcome.kind == COMPLETE:
        text = f"objective={outcome.value:.4f}"
    elif outcome.kind == PRUNED:
        text = f"pruned at epoch {outcome.pruned_epoch}"
    else:
        text = f"{outcome.kind} ({outcome.reason})"
    experiment = tracking.connect(cfg.tracking).experiment_id
    page = tracking.run_link(tracking.ui_url(cfg.tracking), experiment, run_id)
    log.info("%s  mlflow run %s: %s", text, run_id, page)


# --- the sweep process's side: both stores -----------------------------------------------------


def record(study: Any, trial: Any, outcome: Outcome) -> None:
    """Tell ``study`` the outcome of its RUNNING ``trial`` (an ``optuna.trial.Trial``): its user
    attrs, then its state. Called once MLflow has the outcome."""
    from optuna.trial import TrialState

    for key, value in outcome.attrs().items():
        trial.set_user_attr(key, value)
    if outcome.kind in (COMPLETE, DIVERGED):
        study.tell(trial, outcome.value, skip_if_finished=True)
    else:
        state = TrialState.PRUNED if outcome.kind == PRUNED else TrialState.FAIL
        study.tell(trial, state=state, skip_if_finished=True)


def settle(
    study: Any,
    storage: Any,
    trials: Iterable[Any],
    client: Any,
    find_run: Callable[[Any], str | None],
    *,
    force: str | None = None,
    dry_run: bool = False,
) -> dict[int, Outcome]:
    """Complete from MLflow the RUNNING ``trials`` (``FrozenTrial``s) of ``study`` (kept in
    ``storage``): each takes the outcome its MLflow run records (``outcome_of_run``), MLflow
    first. A run still RUNNING is ended KILLED, with reason ``force`` when given (the sweep
    stopped its job), or when its owner process (on this host) is gone; otherwise its trial is
    left RUNNING (its job still works, on another host, say). ``find_run(trial)`` gives a
    trial's run id (None: it has none). The outcomes, by trial number (with ``dry_run``: what
    would be recorded; nothing is written)."""
    from optuna.trial import Trial

    study_id = storage.get_study_id_from_name(study.study_name)
    recorded = {}
    for frozen in trials:
        run_id = find_run(frozen)
        run = client.get_run(run_id) if run_id else None
        if run is None:
            outcome = Outcome(
                FAILED, reason=force or "its sweep process stopped before the trial's run began"
            )
        elif run.info.status == "RUNNING":
            owner = run.data.tags.get(Tag.OWNER, "")
            if force is None and not (owner and processes.owner_alive(owner) is False):
                continue
            outcome = Outcome(FAILED, reason=force or f"interrupted: its process {owner} is gone")
            if not dry_run:
                client.set_tag(run_id, Tag.FAILURE_REASON, outcome.reason)
                client.set_terminated(run_id, "KILLED")
        else:
            outcome = outcome_of_run(run)
        if not dry_run:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
            record(study, Trial(study, trial_id), outcome)
        recorded[frozen.number] = outcome
    return recorded
