"""The comparison report: for each optimizer, the best sweep run in MLflow; its
configuration retrained for the final budget over several seeds (identical initial weights per
seed across optimizers); paired statistics, a figure and report.md, written to
``<paths.outputs>/report/<name>/`` and logged as artifacts of one MLflow run (stage ``report``)
under which the new final runs nest.

Final runs already in the experiment for the same configuration (tag config_hash) and seed are
reused, so a second report with nothing new to train only reads, computes and draws.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from gradalign import tracking
from gradalign.config import config_hash, register_resolvers
from gradalign.experiment import git_tags
from gradalign.report.configs import (
    Composition,
    compose_optimizer,
    config_context,
    final_config,
    hyperparameters,
    seeded,
)
from gradalign.report.finals import FinalJob, FinalResult, train
from gradalign.report.markdown import render
from gradalign.report.plots import plot_convergence
from gradalign.report.runs import (
    MissingSweepError,
    SweepChoice,
    best_sweep_run,
    curves,
    final_runs,
    sweep_command,
)
from gradalign.report.settings import ReportSettings
from gradalign.report.stats import (
    OUTCOMES,
    TESTED,
    Comparison,
    Summary,
    compare,
    outcomes,
    summarize,
)
from gradalign.schema import Metric, Param, Stage, Tag

log = logging.getLogger(__name__)
FIGURE = "convergence_comparison.png"
MARKDOWN = "report.md"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the report will compare, decided before anything is trained or written.

    ``compositions``: each optimizer's config file + the overrides, composed; ``finals``: its
    final-run config (best params, final budget; seeds unset); ``existing``: optimizer -> seed ->
    reusable final run.
    """

    client: MlflowClient
    uri: str
    experiment_id: str
    compositions: dict[str, Composition]
    choices: dict[str, SweepChoice]
    finals: dict[str, DictConfig]
    existing: dict[str, dict[int, Run]]

    def jobs(self, seeds: tuple[int, ...]) -> list[FinalJob]:
        """The final runs still to train."""
        return [
            FinalJob(
                name,
                seed,
                seeded(cfg, seed),
                {Tag.SELECTED_FROM: self.choices[name].run_id},
                estimate_s=self.choices[name].seconds_per_epoch * cfg.trainer.epochs,
            )
            for name, cfg in self.finals.items()
            for seed in seeds
            if seed not in self.existing[name]
        ]


def plan(settings: ReportSettings) -> Plan:
    """Select each optimizer's best sweep run and find its reusable final runs.

    Raises MissingSweepError naming the sweep commands to run.
    """
    register_resolvers(settings.root)
    compositions = {
        name: compose_optimizer(settings.conf_dir, name, settings.overrides)
        for name in settings.optimizers
    }
    first = compositions[settings.baseline].cfg
    uri = tracking.tracking_uri(first.tracking)
    client = tracking.client(uri)
    experiment = client.get_experiment_by_name(first.tracking.experiment)
    if experiment is None or experiment.lifecycle_stage != "active":
        commands = "\n".join(
            sweep_command(name, settings.overrides) for name in settings.optimizers
        )
        raise MissingSweepError(
            f"no MLflow experiment {first.tracking.experiment!r} in {uri}: "
            f"run the sweeps first:\n{commands}"
        )
    experiment_id = experiment.experiment_id

    choices, missing = {}, []
    for name, composition in compositions.items():
        try:
            choices[name] = best_sweep_run(
                client,
                experiment_id,
                name,
                config_context(composition.cfg),
                metric=settings.metric,
                direction=settings.direction,
                overrides=settings.overrides,
            )
        except MissingSweepError as error:
            missing.append(str(error))
    if missing:
        raise MissingSweepError("\n".join(missing))

    finals = {
        name: final_config(
            settings.conf_dir,
            compositions[name],
            choices[name].params,
            epochs=settings.final_epochs,
        )
        for name in settings.optimizers
    }
    existing = {
        name: final_runs(client, experiment_id, config_hash(cfg)) for name, cfg in finals.items()
    }
    return Plan(client, uri, experiment_id, compositions, choices, finals, existing)


def _result(plan: Plan, name: str, seed: int, run: Run, reused: bool) -> FinalResult:
    """A final run's curves and outcomes."""
    run_curves = curves(plan.client, run)
    diverged = run.info.status != "FINISHED"
    per_seed = outcomes(run_curves[Metric.VAL_LOSS], run_curves[Metric.TEST_ACC], diverged)
    init = run.data.tags.get(Tag.INIT_HASH)
    return FinalResult(name, seed, run.info.run_id, reused, diverged, init, run_curves, per_seed)


def check_same_init(results: list[FinalResult]) -> None:
    """Raise RuntimeError unless, for each seed, every optimizer's final run started from the
    same initial weights (equal init_hash tags, as run_experiment logs them)."""
    for seed in sorted({r.seed for r in results}):
        hashes = {r.optimizer: r.init_hash for r in results if r.seed == seed}
        if len(set(hashes.values())) != 1 or None in hashes.values():
            raise RuntimeError(
                f"seed {seed}: the optimizers' final runs did not start from the same initial "
                f"weights (init_hash per optimizer: {hashes}); model initialisation changed "
                "between them, or a run predates the tag"
            )


def _report_dir(outputs: Path, name: str | None) -> Path:
    """A new folder ``outputs/report/<name>`` (default: a timestamp, suffixed -1, -2, ... if
    taken): an existing report is never written into."""
    parent = outputs / "report"
    parent.mkdir(parents=True, exist_ok=True)
    if name is not None:
        try:
            (parent / name).mkdir()
        except FileExistsError:
            raise ValueError(
                f"report folder {parent / name} exists: choose another --name"
            ) from None
        return parent / name
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    for suffix in ("", *(f"-{i}" for i in range(1, 100))):
        try:
            (parent / f"{stamp}{suffix}").mkdir()
            return parent / f"{stamp}{suffix}"
        except FileExistsError:
            continue
    raise RuntimeError(f"no free report folder name for {stamp} under {parent}")


def _log_summary(
    run: tracking.Run, summaries: dict[str, dict[str, Summary]], comparisons: list[Comparison]
) -> None:
    """Outcome means and stds, test statistics as metrics of the report run; verdicts as tags."""
    values = {
        f"{name}/{outcome}/{stat}": getattr(summary, stat)
        for name, per_outcome in summaries.items()
        for outcome, summary in per_outcome.items()
        for stat in ("mean", "std")
    }
    for c in comparisons:
        for outcome in TESTED:
            for stat in ("mean_diff", "p_t", "p_w", "d_z"):
                values[f"{c.optimizer}/{outcome}/{stat}"] = getattr(c.tests[outcome], stat)
    run.log_summary(values, {f"{Tag.VERDICT_PREFIX}{c.optimizer}": c.verdict for c in comparisons})


def _header(
    settings: ReportSettings, plan: Plan, run_id: str, tags: dict[str, str], trained: int
) -> dict[str, str]:
    first = plan.compositions[settings.baseline].cfg
    git = tags.get(Tag.GIT_COMMIT, "unknown")
    if tags.get(Tag.GIT_DIRTY) == "true":
        git += " (with uncommitted changes)"
    total = len(settings.optimizers) * len(settings.seeds)
    return {
        "title": f"{' vs '.join(settings.optimizers)} on {first.dataset.name} / {first.model.name}",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": f"`{settings.command}`" if settings.command else "(called from Python)",
        "MLflow": f"experiment `{first.tracking.experiment}` at `{plan.uri}`, run `{run_id}`",
        "code": f"git {git}",
        "training overrides": " ".join(f"`{o}`" for o in settings.overrides) or "none",
        "final runs": f"{trained} trained by this report, {total - trained} reused",
    }


def make_report(settings: ReportSettings) -> Path:
    """Plan, train the missing final runs, compare, write; the report folder.

    Fails (MissingSweepError, naming the commands to run) before anything is trained or written
    when an optimizer has no sweep.
    """
    the_plan = plan(settings)
    jobs = the_plan.jobs(settings.seeds)
    out_dir = _report_dir(
        Path(the_plan.compositions[settings.baseline].cfg.paths.outputs), settings.name
    )
    log.info(
        "report %s: %d final run(s) to train, %d reused",
        out_dir,
        len(jobs),
        len(settings.optimizers) * len(settings.seeds) - len(jobs),
    )
    params = {
        f"{Param.REPORT_PREFIX}{field}": getattr(settings, field)
        for field in (
            "optimizers",
            "baseline",
            "seeds",
            "final_epochs",
            "metric",
            "direction",
            "primary",
            "alpha",
            "overrides",
        )
    }
    tags = {
        Tag.STAGE: Stage.REPORT,
        Tag.OPTIMIZERS: ",".join(settings.optimizers),
        **git_tags(str(settings.root)),
    }
    with tracking.start_run(
        the_plan.compositions[settings.baseline].cfg.tracking,
        run_name=f"report {out_dir.name}",
        tags=tags,
        params=params,
    ) as run:
        run_ids = train(jobs, parent_run_id=run.run_id, workers=settings.jobs)
        trained = {(job.optimizer, job.seed): rid for job, rid in zip(jobs, run_ids, strict=True)}
        results = [
            _result(
                the_plan,
                name,
                seed,
                the_plan.client.get_run(trained[name, seed])
                if (name, seed) in trained
                else the_plan.existing[name][seed],
                reused=(name, seed) not in trained,
            )
            for name in settings.optimizers
            for seed in settings.seeds
        ]
        check_same_init(results)
        per_seed = {
            name: {o: [r.outcomes[o] for r in results if r.optimizer == name] for o in OUTCOMES}
            for name in settings.optimizers
        }
        summaries = {
            name: {o: summarize(values) for o, values in per_outcome.items()}
            for name, per_outcome in per_seed.items()
        }
        comparisons = compare(per_seed, settings.baseline, settings.primary, settings.alpha)
        header = _header(settings, the_plan, run.run_id, tags, len(jobs))
        plot_convergence(
            {
                name: [r.curves for r in results if r.optimizer == name]
                for name in settings.optimizers
            },
            out_dir / FIGURE,
            title=f"{header['title']}: {settings.final_epochs} epochs, {len(settings.seeds)} seeds",
        )
        hyper = {
            name: hyperparameters(the_plan.compositions[name], the_plan.choices[name].params)
            for name in settings.optimizers
        }
        (out_dir / MARKDOWN).write_text(
            render(
                settings=settings,
                header=header,
                choices=the_plan.choices,
                hyperparameters=hyper,
                finals=results,
                summaries=summaries,
                comparisons=comparisons,
                figure=FIGURE,
            )
        )
        _log_summary(run, summaries, comparisons)
        run.client.log_artifacts(run.run_id, str(out_dir))
    for c in comparisons:
        log.info("%s", c.verdict)
    return out_dir
