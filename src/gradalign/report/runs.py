"""What the report reads from MLflow and Optuna: the sweep each optimizer's best run is taken
from and that run, the final runs that already exist for a configuration, and the per-epoch
curves of a run.

A comparison is fair only if every optimizer was tuned with the same budget, so the report
takes each optimizer's best from one sweep (``Sweep``: the trial runs of one ``sweep_id``, and
its parent run), chosen explicitly (``sweep_id``: a study's own sweeps, or ``--sweeps``) or
else the latest complete sweep of that optimizer with the report's settings; it never pools
the runs of several sweeps. A sweep's budget (``TuningBudget``) is the trials it counts towards its
``n_trials`` (complete, diverged, pruned) and its pruner. Each trial counts by the outcome its
Optuna study records when the study is stored (a trial FAIL in Optuna is not a candidate,
whatever its MLflow run says); a sweep whose study was in memory is read from MLflow alone.

Writing stays in gradalign.tracking; this module only searches and reads, through the client
tracking caches per store.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shlex
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import optuna
from mlflow.entities import Run, ViewType
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from gradalign.checks import UserError
from gradalign.config import anchored_uri
from gradalign.credentials import MASK
from gradalign.optuna_storage import opened
from gradalign.report.configs import optimizer_params, run_context, sweep_command
from gradalign.schema import Metric, Param, Stage, Tag
from gradalign.tracking import tag_filter

log = logging.getLogger(__name__)

# Per-epoch metric keys the report reads (GAO runs add Metric.ALIGNMENT_PREFIX + <param>).
EPOCH_METRICS = (Metric.TRAIN_LOSS, Metric.VAL_LOSS, Metric.VAL_ACC, Metric.TEST_ACC)

# What became of a sweep's trials, as SweepChoice.counts counts them, and the kinds its budget
# counts (those that do not run again when a stored sweep is resumed); only complete trials
# with a finite metric are candidates.
TRIAL_KINDS = ("complete", "diverged", "pruned", "failed", "unfinished")
COUNTED = ("complete", "diverged", "pruned")
# The Optuna trial's user attr naming its MLflow run (gradalign.sweep.trial.RUN_ID).
RUN_ID_ATTR = "mlflow_run_id"
NO_PRUNER = "none"


class MissingSweepError(UserError, LookupError):
    """An optimizer has no usable sweep; the message names the command that makes one."""


def _trials(n: int) -> str:
    return f"{n} trial" if n == 1 else f"{n} trials"


@dataclasses.dataclass(frozen=True)
class TuningBudget:
    """What a sweep spent on tuning: the trials it counts towards its n_trials (complete,
    diverged and pruned ones; a failed trial is run again) and its pruner (``none``, or the
    class name: a pruned sweep trains fewer epochs per trial)."""

    trials: int
    pruner: str = NO_PRUNER

    def __str__(self) -> str:
        pruned = "" if self.pruner == NO_PRUNER else f" ({self.pruner})"
        return f"{_trials(self.trials)}{pruned}"


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One sweep of an optimizer as MLflow holds it: its trial runs and its parent run (None
    for sweeps older than parents), and the settings its runs share (``configs.run_context``;
    None when no run logged params)."""

    sweep_id: str
    runs: tuple[Run, ...]
    parent: Run | None
    settings: dict[str, str] | None

    @property
    def complete(self) -> bool:
        """Whether the sweep ran to its end: its parent FINISHED (the last sweep process in it
        ended normally); without a parent, none of its runs still RUNNING."""
        if self.parent is not None:
            return self.parent.info.status == "FINISHED"
        return all(run.info.status != "RUNNING" for run in self.runs)

    @property
    def ended(self) -> int:
        """When it ended (ms), for "the latest": its parent's end, else its last run's."""
        if self.parent is not None and self.parent.info.end_time:
            return self.parent.info.end_time
        return max(run.info.end_time or run.info.start_time or 0 for run in self.runs)

    def param(self, key: str) -> str | None:
        """The parent's sweeper setting ``key`` (``sweeper.<key>``), None if absent or null."""
        if self.parent is None:
            return None
        value = self.parent.data.params.get(f"{Param.SWEEPER_PREFIX}{key}")
        return None if value in (None, "None") else value

    @property
    def pruner(self) -> str:
        target = self.param("pruner._target_")
        name = target.rsplit(".", 1)[-1] if target else "NopPruner"
        return NO_PRUNER if name == "NopPruner" else name

    @property
    def recorded_trials(self) -> int | None:
        """The trials its parent recorded as counted when the sweep ended (its study's
        complete, diverged and pruned trials); None without a parent or before its end."""
        if self.parent is None:
            return None
        metrics = self.parent.data.metrics
        keys = (Metric.TRIALS_COMPLETE, Metric.TRIALS_DIVERGED, Metric.TRIALS_PRUNED)
        return int(sum(metrics[k] for k in keys)) if Metric.TRIALS_COMPLETE in metrics else None

    def describe(self) -> str:
        """The sweep's id with its status and trials, for messages."""
        status = self.parent.info.status if self.parent is not None else "no parent run"
        trials = self.recorded_trials
        counted = _trials(trials) if trials is not None else f"{len(self.runs)} trial run(s)"
        return f"{self.sweep_id} ({status}, {counted})"


@dataclasses.dataclass(frozen=True)
class SweepChoice:
    """The best trial run of one optimizer's selected sweep, and what the sweep holds.

    ``counts``: the sweep's trials by TRIAL_KINDS (read from its Optuna study when stored, else
    from MLflow: ``outcomes_from``); ``budget``: what it spent (TuningBudget); ``other_sweeps``: the
    optimizer's other sweeps with the report's settings, latest first, as ``Sweep.describe``
    says them (never pooled); ``other_settings``: its sweeps made with other settings;
    ``seconds_per_epoch``: the best run's wall time per epoch, all overheads included;
    ``seeds``: the best run's (seed.model, seed.data).
    """

    optimizer: str
    sweep_id: str
    run_id: str
    value: float
    params: dict[str, str]
    counts: dict[str, int]
    budget: TuningBudget
    outcomes_from: str
    other_sweeps: tuple[str, ...]
    other_settings: int
    seconds_per_epoch: float
    seeds: tuple[int, int]


def search(client: MlflowClient, experiment_id: str, filter_string: str) -> Iterator[Run]:
    """Every active run of the experiment matching ``filter_string``, page by page."""
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string, ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
        )
        yield from page
        token = page.token
        if not token:
            return


def sweeps_of(client: MlflowClient, experiment_id: str, optimizer: str) -> dict[str, Sweep]:
    """Every sweep of ``optimizer`` in the experiment, by sweep_id."""
    grouped: dict[str, list[Run]] = {}
    tags = {Tag.STAGE: Stage.SWEEP, Tag.OPTIMIZER: optimizer}
    for run in search(client, experiment_id, tag_filter(tags)):
        grouped.setdefault(run.data.tags.get(Tag.SWEEP_ID, "(no sweep_id)"), []).append(run)
    parents: dict[str, Run] = {}
    tags = {Tag.STAGE: Stage.SWEEP_PARENT, Tag.OPTIMIZER: optimizer}
    for run in search(client, experiment_id, tag_filter(tags)):
        key = run.data.tags.get(Tag.SWEEP_ID)
        if key not in parents or run.info.start_time < parents[key].info.start_time:
            parents[key] = run  # the oldest, as every sweep process keeps it
    return {
        key: Sweep(
            key,
            tuple(runs),
            parents.get(key),
            next((run_context(r.data.params) for r in runs if r.data.params), None),
        )
        for key, runs in grouped.items()
    }


def resolve(given: Sequence[str], sweeps: Mapping[str, Mapping[str, Sweep]]) -> dict[str, str]:
    """The optimizer -> sweep_id of the ``given`` sweeps (sweep ids, or Optuna study names of
    stored sweeps), among ``sweeps`` (optimizer -> its sweeps). Raises UserError for a sweep
    that is no compared optimizer's, or two given for one optimizer."""
    chosen: dict[str, str] = {}
    for name in given:
        found = [
            (optimizer, key)
            for optimizer, theirs in sweeps.items()
            for key in (name, f"optuna:{name}")
            if key in theirs
        ]
        if not found:
            raise UserError(
                f"invalid setting sweeps: {name!r} is no sweep of the compared optimizers "
                f"{list(sweeps)}; their sweeps: {_listing(sweeps)}"
            )
        optimizer, key = found[0]
        if optimizer in chosen:
            raise UserError(
                f"invalid setting sweeps: two sweeps of {optimizer!r} ({chosen[optimizer]}, "
                f"{key}): give one per optimizer (the report never pools sweeps)"
            )
        chosen[optimizer] = key
    return chosen


def _listing(sweeps: Mapping[str, Mapping[str, Sweep]]) -> str:
    """Each optimizer's sweeps, for messages."""
    return "; ".join(
        f"{optimizer}: " + (", ".join(s.describe() for s in theirs.values()) or "none")
        for optimizer, theirs in sweeps.items()
    )


def _differing(settings: Mapping[str, str], context: Mapping[str, str]) -> set[str]:
    return {k for k in set(settings) | set(context) if settings.get(k) != context.get(k)}


def select_sweep(
    sweeps: Mapping[str, Sweep],
    optimizer: str,
    context: Mapping[str, str],
    *,
    sweep_id: str | None = None,
    overrides: Sequence[str] = (),
) -> Sweep:
    """Sweep ``sweep_id`` of ``optimizer``'s ``sweeps`` when given, else its latest complete
    sweep whose settings are the report's ``context``. Raises MissingSweepError naming the
    sweep command (and the settings in which other sweeps differ) when there is none, and
    UserError when the given one was made with other settings."""
    make = f"Make one with: {shlex.join(sweep_command(optimizer, overrides))}"
    if sweep_id is not None:
        if sweep_id not in sweeps:
            raise MissingSweepError(f"no sweep {sweep_id} of optimizer {optimizer!r}. {make}")
        chosen = sweeps[sweep_id]
        if chosen.settings != context:
            differing = sorted(_differing(chosen.settings or {}, context))
            raise UserError(
                f"sweep {sweep_id} of optimizer {optimizer!r} was made with other settings than "
                f"the report's (differing in {differing}): select another, or give the report "
                "that sweep's training overrides after --"
            )
        return chosen
    matching = [s for s in sweeps.values() if s.settings == context]
    if not matching:
        found = "no sweep with this report's settings"
        other = [s for s in sweeps.values() if s.settings != context]
        if other:
            differing = set().union(*(_differing(s.settings or {}, context) for s in other))
            found += f"; {len(other)} made with other settings (differing in {sorted(differing)})"
        raise MissingSweepError(f"no usable sweep of optimizer {optimizer!r} ({found}). {make}")
    complete = [s for s in matching if s.complete]
    if not complete:
        listed = ", ".join(s.describe() for s in matching)
        raise MissingSweepError(
            f"no complete sweep of optimizer {optimizer!r} with this report's settings, only "
            f"{listed}: rerun a stored one's command to complete it, select one with --sweeps "
            f"ID, or make a new one. {make}"
        )
    return max(complete, key=lambda s: (s.ended, s.sweep_id))


def _run_kind(run: Run) -> str:
    """A trial's kind as its MLflow run records it (gradalign.sweep.trial.outcome_of_run)."""
    status, tags = run.info.status, run.data.tags
    if status == "FINISHED" and tags.get(Tag.PRUNED) == "true":
        return "pruned"
    if status == "FINISHED":
        return "complete" if Metric.OBJECTIVE in run.data.metrics else "failed"
    if status == "FAILED" and tags.get(Tag.DIVERGED) == "true":
        return "diverged"
    return "failed" if status in ("FAILED", "KILLED") else "unfinished"


def _trial_kind(trial: optuna.trial.FrozenTrial) -> str:
    """A trial's kind as its Optuna study records it (COMPLETE with inf: diverged)."""
    if trial.state == TrialState.COMPLETE:
        value = trial.value
        return "complete" if value is not None and math.isfinite(value) else "diverged"
    if trial.state == TrialState.PRUNED:
        return "pruned"
    return "failed" if trial.state == TrialState.FAIL else "unfinished"


def _stored_trials(sweep: Sweep, root: Path, wait_s: float) -> list[optuna.trial.FrozenTrial] | str:
    """The trials of the sweep's stored Optuna study (its storage opened as the sweep opened
    it, waiting up to ``wait_s`` for a process creating it), or why they cannot be read."""
    url, name = sweep.param("storage"), sweep.param("study_name")
    url = anchored_uri(url, root).replace(f":{MASK}@", "@")  # libpq: PGPASSWORD, ~/.pgpass
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
        return f"its storage {url} is gone"
    try:
        with opened(url, wait_s) as storage:
            study_id = storage.get_study_id_from_name(name)
            return storage.get_all_trials(study_id, deepcopy=False)
    except Exception as error:  # a store that moved, went away, or asks for a password
        return f"its storage {url} cannot be read ({type(error).__name__}: {error})"


def trial_kinds(
    sweep: Sweep, root: Path, wait_s: float
) -> tuple[list[tuple[str, Run | None]], str]:
    """Each trial of ``sweep``: its kind (TRIAL_KINDS) and its MLflow run (None: it has none);
    and where the kinds come from: its Optuna study when stored and readable (``root``
    anchors a relative SQLite storage; ``wait_s`` as for the MLflow store), else MLflow (said
    why)."""
    stored = sweep.sweep_id.startswith("optuna:") and sweep.param("storage") is not None
    trials = _stored_trials(sweep, root, wait_s) if stored else "its study was not stored"
    if isinstance(trials, str):
        if stored:
            log.warning("sweep %s: trial outcomes read from MLflow: %s", sweep.sweep_id, trials)
        return [(_run_kind(run), run) for run in sweep.runs], f"MLflow ({trials})"
    by_id = {run.info.run_id: run for run in sweep.runs}
    by_number = {run.data.tags.get(Tag.OPTUNA_TRIAL): run for run in sweep.runs}
    return [
        (
            _trial_kind(trial),
            by_id.get(trial.user_attrs.get(RUN_ID_ATTR)) or by_number.get(str(trial.number)),
        )
        for trial in trials
    ], "its Optuna study"


def best_sweep_run(
    sweeps: Mapping[str, Sweep],
    optimizer: str,
    context: Mapping[str, str],
    *,
    metric: str,
    direction: str,
    root: Path,
    wait_s: float,
    overrides: Sequence[str] = (),
    sweep_id: str | None = None,
) -> SweepChoice:
    """The best run, by ``metric`` in ``direction``, of ``optimizer``'s sweep chosen by
    ``select_sweep`` from its ``sweeps``: among its complete trials (by their Optuna study, when
    stored) whose run FINISHED with a finite ``metric``. Ties go to the earliest run. Raises
    MissingSweepError when there is no such sweep or no such trial."""
    sweep = select_sweep(sweeps, optimizer, context, sweep_id=sweep_id, overrides=overrides)
    kinds, source = trial_kinds(sweep, root, wait_s)
    counts = {kind: sum(k == kind for k, _ in kinds) for kind in TRIAL_KINDS}
    candidates = [
        run
        for kind, run in kinds
        if kind == "complete"
        and run is not None
        and run.info.status == "FINISHED"
        and math.isfinite(run.data.metrics.get(metric, math.nan))
    ]
    if not candidates:
        shown = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n) or "no trials"
        raise MissingSweepError(
            f"no usable trial of optimizer {optimizer!r} in sweep {sweep.sweep_id} ({shown}; "
            f"none complete in {source} with a finite {metric!r}): select another sweep with "
            f"--sweeps ID, or make one with: {shlex.join(sweep_command(optimizer, overrides))}"
        )
    sign = 1 if direction == "minimize" else -1
    best = min(candidates, key=lambda r: (sign * r.data.metrics[metric], r.info.start_time))
    others = sorted(
        (s for s in sweeps.values() if s.settings == context and s is not sweep),
        key=lambda s: -s.ended,
    )
    return SweepChoice(
        optimizer=optimizer,
        sweep_id=sweep.sweep_id,
        run_id=best.info.run_id,
        value=best.data.metrics[metric],
        params=optimizer_params(best.data.params),
        counts=counts,
        budget=TuningBudget(sum(counts[k] for k in COUNTED), sweep.pruner),
        outcomes_from=source,
        other_sweeps=tuple(s.describe() for s in others),
        other_settings=sum(s.settings != context for s in sweeps.values()),
        seconds_per_epoch=(best.info.end_time - best.info.start_time)
        / 1000
        / int(best.data.params["trainer.epochs"]),
        seeds=(int(best.data.params["seed.model"]), int(best.data.params["seed.data"])),
    )


def final_runs(client: MlflowClient, experiment_id: str, config_hash: str) -> dict[int, Run]:
    """Reusable final runs of the configuration ``config_hash`` by seed (seed.model = seed.data):
    FINISHED ones, and FAILED ones tagged diverged=true (a divergence is deterministic for the
    config and seed, so retraining would diverge again); the latest one when a seed has several.
    Runs that failed otherwise, or were killed, are retrained."""
    runs: dict[int, Run] = {}
    filter_string = tag_filter({Tag.STAGE: Stage.FINAL, Tag.CONFIG_HASH: config_hash})
    for run in search(client, experiment_id, filter_string):
        params, status = run.data.params, run.info.status
        diverged = status == "FAILED" and run.data.tags.get(Tag.DIVERGED) == "true"
        if not (status == "FINISHED" or diverged) or params["seed.model"] != params["seed.data"]:
            continue
        seed = int(params["seed.model"])
        if seed not in runs or run.info.start_time > runs[seed].info.start_time:
            runs[seed] = run
    return runs


def curves(client: MlflowClient, run: Run) -> dict[str, list[float]]:
    """The run's per-epoch metrics (EPOCH_METRICS and the scales), each ordered by epoch; a run
    logged under the keys used before they were renamed (Metric.LEGACY) is read under those
    and returned under today's, so a report reuses final runs of either kind."""
    logged = run.data.metrics
    sources = {key: key if key in logged else Metric.LEGACY[key] for key in EPOCH_METRICS}
    scales = sorted(k for k in logged if k.startswith(Metric.ALIGNMENT_PREFIX))
    old = Metric.LEGACY_ALIGNMENT_PREFIX
    legacy = [] if scales else sorted(k for k in logged if k.startswith(old))
    sources |= {k: k for k in scales}
    sources |= {f"{Metric.ALIGNMENT_PREFIX}{k.removeprefix(old)}": k for k in legacy}
    result = {}
    for key, source in sources.items():
        history = sorted(client.get_metric_history(run.info.run_id, source), key=lambda m: m.step)
        result[key] = [m.value for m in history]
    return result
