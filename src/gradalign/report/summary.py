"""What every summary of a study of several parts shares (an audit, a workload suite): one MLflow
run (stage ``study``) under which every part's report, and their final runs, nest; the study's
folder ``<outputs>/report/<name>/``; every part's report written first; the folder logged as the
run's artifacts once the summary's page is in it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import platform
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from gradalign import tracking
from gradalign.records import git_tags
from gradalign.report.build import Report, report_target, write_report
from gradalign.report.configs import compose_optimizer
from gradalign.report.settings import ReportSettings, StudySettings
from gradalign.schema import Param, Stage, Tag

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SummaryRun:
    """An open summary: its MLflow run, its folder, every part's written report, and the first
    part's composed baseline config (its tracking settings and ``reference``)."""

    run: tracking.Run
    folder: Path
    reports: dict[str, Report]
    cfg: DictConfig

    def finish(
        self,
        values: Mapping[str, float],
        verdicts: Mapping[str, str],
        lines: Sequence[str],
        smoke: bool,
    ) -> None:
        """Log the summary's statistics (metrics) and verdicts (tags), a smoke run as such, and
        its verdict ``lines`` as the run's description and on the console: every view says the
        same."""
        self.run.log_summary(values, {**verdicts, **({Tag.SMOKE_RUN: "true"} if smoke else {})})
        self.run.description = "\n".join(lines)
        for line in lines:
            log.info("%s", line)


@contextlib.contextmanager
def summary_run(
    settings: StudySettings, name: str, parts: Mapping[str, ReportSettings], kind: str
) -> Iterator[SummaryRun]:
    """Open (or resume) the study's MLflow run, write every part's report under it, and yield;
    on a clean exit log the folder as the run's artifacts. ``kind`` names the run
    (``<kind> <name>``)."""
    first = next(iter(parts.values()))
    cfg = compose_optimizer(first.conf_dir, first.baseline, first.overrides_of(first.baseline)).cfg
    store = tracking.connect(cfg.tracking)
    folder, resume = report_target(
        store.client, store.experiment_id, Path(cfg.paths.outputs), name, stage=Stage.STUDY
    )
    tags = {Tag.STAGE: Stage.STUDY, Tag.REPORT_NAME: name, **git_tags(str(first.root))}
    params = {
        f"{Param.REPORT_PREFIX}preset": settings.preset,
        f"{Param.REPORT_PREFIX}trials": settings.trials,
    }
    with tracking.start_run(
        cfg.tracking, run_name=f"{kind} {name}", tags=tags, params=params, resume_run_id=resume
    ) as run:
        reports = {part: write_report(s, parent_run_id=run.run_id) for part, s in parts.items()}
        yield SummaryRun(run, folder, reports, cfg)
        run.client.log_artifacts(run.run_id, str(folder))


def provenance(settings: StudySettings, run_id: str, nested: str, details: str = "") -> list[str]:
    """The lines under a summary page's title: when, by which command, on which machine, its
    MLflow run (under which the ``nested`` reports are), and its preset (then ``details``)."""
    command = settings.report.command
    return [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `{command}`" if command else "- command: (called from Python)",
        f"- machine: {platform.machine()} {platform.processor() or 'cpu'}, "
        f"{os.cpu_count()} core(s), torch {torch.__version__}, one thread per run",
        f"- MLflow run `{run_id}` (stage `study`); {nested} nest under it",
        f"- preset: conf/study/{settings.preset}.yaml, {settings.trials} trials per sweep"
        + details,
    ]
