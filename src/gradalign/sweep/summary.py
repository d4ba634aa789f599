"""What a sweep tells a person: where it writes (at the start) and what it found (at the end), in
the terminal and on its MLflow parent run.

At the end, from the Optuna study (every trial of it, those of other processes sharing it
included), the parent run gets: the trials by outcome and the best objective as metrics, the
objective of each trial and the best so far as metric series (step = trial number), the best
trial's run and values as tags (not params: MLflow never changes a param, and a resumed study
can find a better trial), Optuna's optimisation-history and slice plots, a description that
shows all of it, and a name that says the best values. docs/tracking.md lists the keys.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

from mlflow.entities import Metric as MlflowMetric
from mlflow.entities import RunStatus
from omegaconf import DictConfig
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from gradalign import tracking
from gradalign.schema import Metric, MlflowTag, Tag
from gradalign.sweep.runs import parent_label, sweep_view_key
from gradalign.sweep.trial import COMPLETE, DIVERGED, FAILED, PRUNED, RUNNING
from gradalign.tracking.labels import artifact_image, run_link, runs_link, values_text

log = logging.getLogger(__name__)
FIGURES = ("optimization_history.png", "optimization_slice.png")
OUTCOMES = (COMPLETE, DIVERGED, FAILED, PRUNED, RUNNING)  # a trial as the summary counts it
_COUNT_METRICS = {
    COMPLETE: Metric.TRIALS_COMPLETE,
    DIVERGED: Metric.TRIALS_DIVERGED,
    FAILED: Metric.TRIALS_FAILED,
    PRUNED: Metric.TRIALS_PRUNED,
}


@dataclasses.dataclass(frozen=True)
class TrialRecord:
    """One Optuna trial as the summary shows it: its number, outcome (one of OUTCOMES), objective
    (None unless complete or diverged), sampled values and MLflow run."""

    number: int
    outcome: str
    value: float | None
    params: dict[str, Any]
    run_id: str | None


@dataclasses.dataclass(frozen=True)
class SweepSummary:
    """A study's trials in number order, and its direction."""

    trials: list[TrialRecord]
    minimize: bool

    def count(self, outcome: str) -> int:
        return sum(trial.outcome == outcome for trial in self.trials)

    @property
    def best(self) -> TrialRecord | None:
        """The complete trial with the best objective (the first on ties), or None."""
        sign = 1 if self.minimize else -1
        complete = [t for t in self.trials if t.outcome == COMPLETE]
        return min(complete, key=lambda t: (sign * t.value, t.number), default=None)

    def best_so_far(self) -> list[tuple[int, float, float]]:
        """(trial number, its objective, the best objective up to it) of each complete trial."""
        rows, best = [], None
        for trial in self.trials:
            if trial.outcome != COMPLETE:
                continue
            better = best is None or (trial.value < best if self.minimize else trial.value > best)
            best = trial.value if better else best
            rows.append((trial.number, trial.value, best))
        return rows

    def counts_text(self) -> str:
        """``30 trials: 27 complete, 2 diverged, 1 failed, 0 pruned``."""
        parts = [f"{self.count(o)} {o}" for o in OUTCOMES if o != RUNNING or self.count(o)]
        return f"{len(self.trials)} trials: " + ", ".join(parts)


def _outcome(trial: FrozenTrial) -> str:
    if trial.state == TrialState.COMPLETE:
        return COMPLETE if trial.value is not None and math.isfinite(trial.value) else DIVERGED
    if trial.state == TrialState.PRUNED:
        return PRUNED
    if trial.state == TrialState.FAIL:
        return FAILED
    return RUNNING


def summarize(study: Study) -> SweepSummary:
    """The summary of ``study``'s trials as its storage has them now."""
    trials = study.get_trials(deepcopy=False)
    records = [
        TrialRecord(
            number=t.number,
            outcome=_outcome(t),
            value=t.value if t.state == TrialState.COMPLETE else None,
            params=dict(t.params),
            run_id=t.user_attrs.get("mlflow_run_id"),
        )
        for t in sorted(trials, key=lambda t: t.number)
    ]
    return SweepSummary(records, study.direction == StudyDirection.MINIMIZE)


def history_figures(study: Study, folder: Path, title: str) -> list[Path]:
    """Optuna's plots of ``study`` in ``folder`` (FIGURES): its optimisation history (each
    trial's objective and the best so far) and its slice plot (the objective against each
    searched value, on a log axis where the search was). Diverged trials (objective inf) are
    left out of both, without Optuna's warning for each: the description counts them."""
    import matplotlib  # only when a sweep ends: 0.5 s of import
    from matplotlib import pyplot as plt
    from optuna.visualization import matplotlib as plots

    logging.getLogger("optuna.visualization._utils").setLevel(logging.ERROR)
    paths = []
    with matplotlib.rc_context(), warnings.catch_warnings():  # Optuna's style stays in here
        warnings.simplefilter("ignore")  # experimental API, an axis of one trial: not the user's
        for name, plot in zip(
            FIGURES, (plots.plot_optimization_history, plots.plot_slice), strict=True
        ):
            axes = plot(study, target_name=Metric.OBJECTIVE)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.suptitle(title)
            figure.savefig(folder / name, dpi=80)
            plt.close(figure)
            paths.append(folder / name)
    return paths


def best_text(summary: SweepSummary) -> str:
    """``best objective 1.1191 at trial 17 (lr=2.06e-3 beta=0.945)``, or why there is none."""
    best = summary.best
    if best is None:
        return "no trial completed with a finite objective"
    return f"best {Metric.OBJECTIVE} {best.value:.4f} at trial {best.number} " + (
        f"({values_text(best.params)})"
    )


def describe(
    summary: SweepSummary, experiment_id: str, parent_run_id: str, sweep: str, view: str
) -> str:
    """The parent run's description: the best trial first, the counts and the link to the
    saved ``view`` of the trials, then the figures."""
    best = summary.best
    first = f"**{best_text(summary)}**"
    if best is not None and best.run_id:
        first += f" · [the trial's run]({run_link('', experiment_id, best.run_id)})"
    trials = f"[its trials by {Metric.OBJECTIVE}]({runs_link('', experiment_id, view)})"
    return "\n\n".join(
        [
            first,
            f"{summary.counts_text()}. Sweep `{sweep}`: {trials} nest under this run.",
            artifact_image(parent_run_id, FIGURES[0], "optimisation history"),
            artifact_image(parent_run_id, FIGURES[1], "objective against each searched value"),
        ]
    )


def _new_history(client: Any, parent_run_id: str, summary: SweepSummary) -> list[MlflowMetric]:
    """The per-trial metric points the parent does not have yet (a resumed or shared study
    wrote the earlier ones)."""
    logged = {m.step for m in client.get_metric_history(parent_run_id, Metric.TRIAL_OBJECTIVE)}
    timestamp = int(time.time() * 1000)
    points = []
    for number, value, best in summary.best_so_far():
        if number not in logged:
            points.append(MlflowMetric(Metric.TRIAL_OBJECTIVE, value, timestamp, number))
            points.append(MlflowMetric(Metric.BEST_OBJECTIVE, best, timestamp, number))
    return points


def write_summary(
    store: tracking.Store, cfg: DictConfig, parent_run_id: str, study: Study
) -> SweepSummary:
    """Write ``study``'s summary on the sweep's parent run (see the module docstring), the
    figures also into the sweep directory; the summary."""
    summary = summarize(study)
    client = store.client
    sweep_dir = Path(cfg.hydra.sweep.dir)
    label = parent_label(cfg)
    for figure in history_figures(study, sweep_dir, f"{cfg.optimizer.name} sweep {label}"):
        client.log_artifact(parent_run_id, str(figure))
    timestamp = int(time.time() * 1000)
    metrics = _new_history(client, parent_run_id, summary) + [
        MlflowMetric(key, summary.count(outcome), timestamp, 0)
        for outcome, key in _COUNT_METRICS.items()
    ]
    best = summary.best
    note = describe(summary, store.experiment_id, parent_run_id, label, sweep_view_key(cfg))
    tags = {MlflowTag.NOTE: note}
    if best is not None:
        tags[Tag.BEST_TRIAL] = str(best.number)
        if best.run_id:
            tags[Tag.BEST_RUN_ID] = best.run_id
        tags.update({f"{Tag.BEST_PREFIX}{k}": str(v) for k, v in best.params.items()})
    tracking.log_batch(client, parent_run_id, metrics=metrics, tags=tags)
    name = f"{cfg.optimizer.name} sweep {label}"
    if best is not None:
        name += f": best {best.value:.4g} ({values_text(best.params)})"
    client.update_run(parent_run_id, name=name)
    return summary


def end_line(
    store: tracking.Store,
    cfg: DictConfig,
    parent_run_id: str,
    summary: SweepSummary | None,
    status: str,
) -> str:
    """The line a sweep prints when it ends: its status, trials, best, and the parent's page."""
    page = tracking.run_link(tracking.ui_url(cfg.tracking), store.experiment_id, parent_run_id)
    found = (
        f"{summary.counts_text()}; {best_text(summary)}"
        if summary
        else "its trials could not be counted (the study was not readable)"
    )
    return f"sweep {status}: {found}; MLflow parent {page}"


def announce(store: tracking.Store, cfg: DictConfig, parent_run_id: str, n_trials: int) -> None:
    """Print what a sweep says before its first trial: where its outputs go, and its MLflow
    parent with the link to its trials in the UI (and how to serve the UI of a local store). A
    store that fails here is logged: the sweep goes on."""
    try:
        base = tracking.ui_url(cfg.tracking)
        lines = [
            f"sweep of {cfg.optimizer.name}: {n_trials} trials, outputs in {cfg.hydra.sweep.dir}",
            f"MLflow parent run {parent_run_id}, its trials at "
            f"{tracking.runs_link(base, store.experiment_id, sweep_view_key(cfg))}",
        ]
        serve = tracking.serve_command(cfg.tracking)
        if serve is not None and not cfg.tracking.ui_url:
            lines.append(f"  (serve the UI with: {serve})")
    except Exception as error:
        log.warning("could not make the sweep's MLflow link: %s", error)
        return
    print("\n".join(lines), flush=True)


def finish(
    store: tracking.Store,
    cfg: DictConfig,
    parent_run_id: str,
    study: Study | None,
    status: int,
    reason: str | None,
    storage: str | None = None,
) -> bool:
    """The sweep process's last words on its parent run: write the study's summary (when a
    trial was asked), end the parent with ``status`` unless another process still works in it
    (``storage``: the Optuna database whose lock serialises both, see close_sweep_parent), and
    print end_line (not without ``study``: a sweep its storage stopped counts its trials in its
    own last line). Store failures are logged, not raised: the sweep's own outcome is what the
    user must see. Whether the parent could be written."""
    found = None

    def write() -> None:
        nonlocal found
        try:
            found = write_summary(store, cfg, parent_run_id, study)
        except Exception as error:
            log.warning(
                "could not write the sweep's summary on MLflow run %s: %s", parent_run_id, error
            )

    try:
        tracking.close_sweep_parent(
            store,
            parent_run_id,
            status,
            reason,
            storage=storage,
            first=write if study is not None else None,
        )
        if study is not None:
            print(
                end_line(store, cfg, parent_run_id, found, RunStatus.to_string(status)),
                flush=True,
            )
    except Exception as error:
        log.warning("could not end the sweep's MLflow parent run %s: %s", parent_run_id, error)
        return False
    return True


def interrupted_line(storage: Any, study_name: str | None) -> str:
    """The last line of an interrupted sweep (its runs and trials are already marked): how to
    go on."""
    if isinstance(storage, str) and study_name:
        return (
            f"interrupted: the study {study_name!r} is stored in {storage}; resume it with the "
            "same command (it runs the trials missing to hydra.sweeper.n_trials, the study's "
            "budget)"
        )
    return (
        "interrupted: the study was in memory, so a rerun starts a new one (set "
        "hydra.sweeper.storage and hydra.sweeper.study_name to make a sweep resumable)"
    )
