"""What every summary of a study of several parts shares (an audit, a workload suite): one MLflow
run (stage ``study``) under which every part's report, and their final runs, nest; the study's
folder ``<outputs>/report/<name>/``; every part's report written first; the folder logged as the
run's artifacts once the summary's page is in it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

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
