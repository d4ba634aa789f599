"""The comparison report: for each optimizer, the best sweep run in MLflow; its
configuration retrained for the final budget over several seeds (identical initial weights per
seed across optimizers); paired statistics, a figure and report.md, written to
``<paths.outputs>/report/<name>/`` and logged as artifacts of one MLflow run (stage ``report``)
under which the new final runs nest.

Final runs already in the experiment for the same configuration (tag config_hash) and seed are
reused, so a second report with nothing new to train only reads, computes and draws.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from gradalign import processes, tracking
from gradalign.checks import UserError
from gradalign.config import config_hash, flatten, register_resolvers
from gradalign.records import source_tags
from gradalign.report import keys, page
from gradalign.report.configs import (
    Composition,
    compose_optimizer,
    final_config,
    hyperparameters,
    logged_params,
    run_context,
    seeded,
    sweep_command,
)
from gradalign.report.finals import FinalJob, FinalResult, train
from gradalign.report.html import to_html
from gradalign.report.markdown import render
from gradalign.report.plots import plot_convergence
from gradalign.report.runs import (
    MissingSweepError,
    SweepChoice,
    best_sweep_run,
    curves,
    final_runs,
    resolve,
    sweeps_of,
)
from gradalign.report.settings import ReportSettings
from gradalign.report.stats import (
    LOGGED,
    PER_SEED_OUTCOMES,
    TESTED,
    Comparison,
    MeanStd,
    Verdict,
    compare,
    is_smoke,
    mean_std,
    outcomes,
)
from gradalign.schema import Metric, Param, Stage, Tag
from gradalign.tracking import tag_filter

log = logging.getLogger(__name__)
FIGURE = "convergence_comparison.png"
MARKDOWN = "report.md"
HTML = "report.html"  # report.md as one page, its figure inlined (MLflow's viewer shows it)
OTHERS_SHOWN = 5  # an optimizer's other sweeps listed when budgets differ, the latest first


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

    @property
    def equal_budgets(self) -> bool:
        """Whether every optimizer's sweep spent the same tuning budget."""
        return len({choice.budget for choice in self.choices.values()}) == 1

    @property
    def budgets(self) -> str:
        """Each optimizer's tuning budget in words: "30 trials each", or "adam 30 trials,
        gao 10 trials" when they differ."""
        if self.equal_budgets:
            return f"{next(iter(self.choices.values())).budget} each"
        return ", ".join(f"{name} {choice.budget}" for name, choice in self.choices.items())

    @property
    def final_epochs(self) -> str:
        """The final runs' budget in epochs ("25", or "25/50" if the optimizers' differ)."""
        return "/".join(sorted({str(cfg.trainer.epochs) for cfg in self.finals.values()}))

    def jobs(self, seeds: tuple[int, ...]) -> list[FinalJob]:
        """The final runs still to train."""
        return [
            FinalJob(
                name,
                seed,
                seeded(cfg, seed),
                {Tag.SELECTED_FROM: self.choices[name].run_id},
                estimate_s=self.choices[name].seconds_per_epoch * cfg.trainer.epochs,
                searched=tuple(k for k in flatten(cfg) if k in self.compositions[name].searched),
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
        name: compose_optimizer(settings.conf_dir, name, settings.overrides_of(name))
        for name in settings.optimizers
    }
    first = compositions[settings.baseline].cfg
    uri = tracking.tracking_uri(first.tracking)
    client = tracking.client(uri, first.tracking.store_wait_s)
    experiment = client.get_experiment_by_name(first.tracking.experiment)
    if experiment is None or experiment.lifecycle_stage != "active":
        commands = "\n".join(
            shlex.join(sweep_command(name, settings.overrides_of(name)))
            for name in settings.optimizers
        )
        raise MissingSweepError(
            f"no MLflow experiment {first.tracking.experiment!r} in {uri}: "
            f"run the sweeps first:\n{commands}"
        )
    experiment_id = experiment.experiment_id

    sweeps = {name: sweeps_of(client, experiment_id, name) for name in settings.optimizers}
    given = resolve(settings.sweeps or (), sweeps)
    choices, missing = {}, []
    for name, composition in compositions.items():
        try:
            choices[name] = best_sweep_run(
                sweeps[name],
                name,
                run_context(logged_params(composition.cfg)),
                metric=settings.metric,
                direction=settings.direction,
                root=settings.root,
                wait_s=first.tracking.store_wait_s,
                overrides=settings.overrides_of(name),
                sweep_id=given.get(name),
            )
        except MissingSweepError as error:
            missing.append(str(error))
    if missing:
        raise MissingSweepError("; ".join(missing))  # one line, every optimizer missing
    check_budgets(choices, settings.unequal_budgets)

    finals = {
        name: final_config(
            settings.conf_dir,
            compositions[name],
            choices[name].params,
            epochs=settings.final_epochs or compositions[name].cfg.trainer.epochs,
        )
        for name in settings.optimizers
    }
    existing = {
        name: final_runs(client, experiment_id, config_hash(cfg)) for name, cfg in finals.items()
    }
    return Plan(client, uri, experiment_id, compositions, choices, finals, existing)


class UnequalBudgets(UserError):
    """The selected sweeps spent unequal tuning budgets (and --unequal-budgets was not given)."""


def check_budgets(choices: dict[str, SweepChoice], unequal_budgets: bool) -> None:
    """Raise UnequalBudgets, in one line that says how to select sweeps of one budget, unless
    every optimizer's selected sweep spent the same tuning budget or ``unequal_budgets``
    allows it."""
    if unequal_budgets or len({c.budget for c in choices.values()}) <= 1:
        return
    selected = ", ".join(
        f"{name} {choice.budget} (sweep {choice.sweep_id})" for name, choice in choices.items()
    )
    others = "; ".join(
        f"{name}: {', '.join(choice.other_sweeps[:OTHERS_SHOWN]) or 'none'}"
        for name, choice in choices.items()
    )
    raise UnequalBudgets(
        f"unequal tuning budgets: {selected}. A fair comparison tunes every optimizer with the "
        "same budget: select sweeps of one budget with --sweeps ID ... (their other sweeps with "
        f"these settings: {others}), rerun a stored sweep's command to complete its trials, or "
        "compare these anyway with --unequal-budgets (the verdict then says so)"
    )


def _result(plan: Plan, name: str, seed: int, run: Run, reused: bool) -> FinalResult:
    """A final run's curves and outcomes."""
    run_curves = curves(plan.client, run)
    diverged = run.info.status != "FINISHED"
    per_seed = outcomes(run_curves[Metric.VAL_LOSS], run_curves[Metric.TEST_ACC], diverged)
    init = run.data.tags.get(Tag.INIT_HASH)
    return FinalResult(name, seed, run.info.run_id, reused, diverged, init, run_curves, per_seed)


def check_same_init(results: list[FinalResult]) -> None:
    """Raise UserError unless, for each seed, every optimizer's final run started from the
    same initial weights (equal init_hash tags, as run_experiment logs them)."""
    for seed in sorted({r.seed for r in results}):
        hashes = {r.optimizer: r.init_hash for r in results if r.seed == seed}
        if len(set(hashes.values())) != 1 or None in hashes.values():
            raise UserError(
                f"seed {seed}: the optimizers' final runs did not start from the same initial "
                f"weights (init_hash per optimizer: {hashes}); model initialisation changed "
                "between them, or a run predates the tag"
            )


def report_target(
    client: MlflowClient,
    experiment_id: str,
    outputs: Path,
    name: str | None,
    overwrite: bool = False,
    stage: str = Stage.REPORT,
) -> tuple[Path, str | None]:
    """(the report's folder, the run id of the unfinished report to resume, or None).

    Without a name: a new folder ``outputs/report/<timestamp>`` (suffixed -1, -2, ... if taken).
    With ``--name``: ``outputs/report/<name>``, new; or, if a report of that name was started
    and did not finish (it failed, was killed, or its process is gone), that report again, so
    that a rerun resumes it and reuses its finished final runs. A finished report, or one whose
    process is still running, is never written into, unless ``overwrite`` (a part of a study,
    which that study rewrites from its tracked runs whenever it runs) allows a finished one.
    """
    parent = outputs / "report"
    parent.mkdir(parents=True, exist_ok=True)
    if name is None:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        for suffix in ("", *(f"-{i}" for i in range(1, 100))):
            with contextlib.suppress(FileExistsError):
                (parent / f"{stamp}{suffix}").mkdir()
                return parent / f"{stamp}{suffix}", None
        raise UserError(f"no free report folder name for {stamp} under {parent}")
    folder = parent / name
    previous = client.search_runs(
        [experiment_id],
        tag_filter({Tag.STAGE: stage, Tag.REPORT_NAME: name}),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not previous:
        if folder.exists() and any(folder.iterdir()):
            raise UserError(f"report folder {folder} exists: choose another --name")
        folder.mkdir(exist_ok=True)
        return folder, None
    run = previous[0]
    if run.info.status == "FINISHED" and not overwrite:
        raise UserError(f"report {name!r} is complete ({folder}): choose another --name")
    owner = run.data.tags.get(Tag.OWNER)
    if run.info.status == "RUNNING" and owner and processes.owner_alive(owner) is not False:
        raise UserError(f"report {name!r} is being written by process {owner}: wait for it")
    folder.mkdir(exist_ok=True)
    log.info("resuming report %r (MLflow run %s, %s)", name, run.info.run_id, run.info.status)
    return folder, run.info.run_id


def _check_same_settings(
    client: MlflowClient, run_id: str, params: dict[str, Any], name: str
) -> None:
    """Raise UserError unless the report run ``run_id`` was started with ``params``."""
    logged = client.get_run(run_id).data.params
    differing = sorted(k for k, v in params.items() if k in logged and logged[k] != str(v))
    if differing:
        shown = ", ".join(f"{k}: {logged[k]} then, {params[k]} now" for k in differing)
        raise UserError(
            f"report {name!r} was started with other settings ({shown}): rerun it with the "
            "same ones, or choose another --name"
        )


def _log_summary(
    run: tracking.Run, summaries: dict[str, dict[str, MeanStd]], comparisons: list[Comparison]
) -> None:
    """Outcome means and stds, test statistics (a smoke run's: the mean differences only) as
    metrics of the report run; verdict sentences as tags, and a smoke run as one."""
    values = {
        f"{name}/{outcome}/{stat}": getattr(summary, stat)
        for name, per_outcome in summaries.items()
        for outcome, summary in per_outcome.items()
        for stat in ("mean", "std")
    }
    for c in comparisons:
        logged = LOGGED if c.verdict is not Verdict.SMOKE else ("mean_diff",)
        for outcome in TESTED:
            for stat in logged:
                values[f"{c.optimizer}/{outcome}/{stat}"] = getattr(c.tests[outcome], stat)
    tags = {f"{Tag.VERDICT_PREFIX}{c.optimizer}": c.sentence for c in comparisons}
    if is_smoke(comparisons):
        tags[Tag.SMOKE_RUN] = "true"
    run.log_summary(values, tags)


def _header(
    settings: ReportSettings,
    plan: Plan,
    run_id: str,
    tags: dict[str, str],
    trained: int,
    smoke: bool,
) -> dict[str, str]:
    first = plan.compositions[settings.baseline].cfg
    git = tags.get(Tag.GIT_COMMIT, "unknown")
    if tags.get(Tag.GIT_DIRTY) == "true":
        git += " (with uncommitted changes)"
    total = len(settings.optimizers) * len(settings.seeds)
    return {
        "title": f"{' vs '.join(settings.optimizers)} on {first.dataset.name} / {first.model.name}"
        + (" (SMOKE RUN)" if smoke else ""),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": f"`{settings.command}`" if settings.command else "(called from Python)",
        "MLflow": f"experiment `{first.tracking.experiment}` at `{plan.uri}`, run `{run_id}`",
        "code": f"git {git}",
        "training overrides": " ".join(f"`{o}`" for o in settings.overrides) or "none",
        "tuning budgets": plan.budgets
        + ("" if plan.equal_budgets else " (UNEQUAL, compared by --unequal-budgets)"),
        "final runs": f"{trained} trained by this report, {total - trained} reused",
    }


@dataclasses.dataclass(frozen=True)
class Report:
    """A written report: where, its MLflow run, and what it found (for a study that combines
    several reports)."""

    out_dir: Path
    run_id: str
    plan: Plan
    finals: list[FinalResult]
    hyperparameters: dict[str, dict[str, str]]
    comparisons: list[Comparison]


def write_report(settings: ReportSettings, parent_run_id: str | None = None) -> Report:
    """Plan, train the missing final runs, compare, write; the Report. Its MLflow run nests
    under ``parent_run_id`` when given.

    Fails (MissingSweepError, naming the commands to run) before anything is trained or written
    when an optimizer has no sweep.
    """
    the_plan = plan(settings)
    jobs = the_plan.jobs(settings.seeds)
    out_dir, resume_run_id = report_target(
        the_plan.client,
        the_plan.experiment_id,
        Path(the_plan.compositions[settings.baseline].cfg.paths.outputs),
        settings.name,
        settings.overwrite,
    )
    log.info(
        "report %s: %d final run(s) to train, %d reused",
        out_dir,
        len(jobs),
        len(settings.optimizers) * len(settings.seeds) - len(jobs),
    )
    params = {
        f"{Param.REPORT_PREFIX}{name}": getattr(settings, name)
        for name, (spec, *_) in keys.keys(ReportSettings).items()
        if spec.param
    }
    params[f"{Param.REPORT_PREFIX}overrides"] = settings.overrides
    for name, choice in the_plan.choices.items():  # what each optimizer's best was chosen from
        params[f"{Param.REPORT_PREFIX}sweep.{name}"] = choice.sweep_id
        params[f"{Param.REPORT_PREFIX}trials.{name}"] = choice.budget.trials
    tags = {
        Tag.STAGE: Stage.REPORT,
        Tag.REPORT_NAME: out_dir.name,
        Tag.OPTIMIZERS: ",".join(settings.optimizers),
        **source_tags(str(settings.root), Path(sys.argv[0]).name),
    }
    if resume_run_id is not None:
        _check_same_settings(the_plan.client, resume_run_id, params, out_dir.name)
    with tracking.start_run(
        the_plan.compositions[settings.baseline].cfg.tracking,
        run_name=f"report {out_dir.name}: {' vs '.join(settings.optimizers)}",
        tags=tags,
        params={},
        parent_run_id=parent_run_id,
        resume_run_id=resume_run_id,
        description=f"Report {out_dir.name}: running; its verdict is written here when it ends.",
    ) as run:
        # now, not with the first flush: a resumed report is checked against them
        tracking.log_batch(run.client, run.run_id, params=params)
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
            name: {
                o: [r.outcomes[o] for r in results if r.optimizer == name]
                for o in PER_SEED_OUTCOMES
            }
            for name in settings.optimizers
        }
        summaries = {
            name: {o: mean_std(values) for o, values in per_outcome.items()}
            for name, per_outcome in per_seed.items()
        }
        comparisons = compare(
            per_seed,
            settings.baseline,
            settings.primary,
            settings.alpha,
            min_pairs=settings.min_pairs,
            smoke=settings.smoke,
        )
        if not the_plan.equal_budgets:  # allowed by --unequal-budgets: every view says so
            said = f" UNEQUAL TUNING BUDGETS: {the_plan.budgets}."
            comparisons = [dataclasses.replace(c, sentence=c.sentence + said) for c in comparisons]
        header = _header(settings, the_plan, run.run_id, tags, len(jobs), is_smoke(comparisons))
        plot_convergence(
            {
                name: [r.curves for r in results if r.optimizer == name]
                for name in settings.optimizers
            },
            out_dir / FIGURE,
            title=f"{header['title']}: {the_plan.final_epochs} epochs, {len(settings.seeds)} seeds",
        )
        hyper = {
            name: hyperparameters(the_plan.compositions[name], the_plan.choices[name].params)
            for name in settings.optimizers
        }
        text = render(
            settings=settings,
            header=header,
            choices=the_plan.choices,
            hyperparameters=hyper,
            finals=results,
            final_epochs=the_plan.final_epochs,
            summaries=summaries,
            comparisons=comparisons,
            figure=FIGURE,
        )
        (out_dir / MARKDOWN).write_text(text)
        (out_dir / HTML).write_text(to_html(text, out_dir, header["title"]))
        _log_summary(run, summaries, comparisons)
        run.client.log_artifacts(run.run_id, str(out_dir))
        page.save_view(
            run.client,
            the_plan.experiment_id,
            out_dir.name,
            run.run_id,
            results,
            sorted({k for c in the_plan.compositions.values() for k in c.searched}),
            settings.primary,
        )
        page.show_verdicts(
            run.client,
            the_plan.experiment_id,
            run.run_id,
            comparisons,
            settings.primary,
            settings.alpha,
        )
        run.description = page.description(
            run_id=run.run_id,
            experiment_id=the_plan.experiment_id,
            title=header["title"],
            comparisons=comparisons,
            hyperparameters=hyper,
            choices=the_plan.choices,
            figure=FIGURE,
            finals=len(results),
            trained=len(jobs),
            report_name=out_dir.name,
        )
    for c in comparisons:
        log.info("%s", c.sentence)
    ui = tracking.ui_url(the_plan.compositions[settings.baseline].cfg.tracking)
    log.info("MLflow: report %s", tracking.run_link(ui, the_plan.experiment_id, run.run_id))
    log.info(
        "       its final runs by optimizer %s",
        tracking.runs_link(ui, the_plan.experiment_id, page.view_key(out_dir.name), charts=True),
    )
    return Report(out_dir, run.run_id, the_plan, results, hyper, comparisons)
