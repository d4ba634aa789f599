"""What the report reads from MLflow: each optimizer's best sweep run, the final runs that already
exist for a configuration, and the per-epoch curves of a run.

Writing stays in gradalign.tracking; this module only searches and reads, through the client
tracking caches per store.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import shlex
from collections.abc import Iterator, Mapping, Sequence

from mlflow.entities import Run, ViewType
from mlflow.tracking import MlflowClient

from gradalign.checks import UserError
from gradalign.report.configs import optimizer_params, run_context, sweep_command
from gradalign.schema import Metric, Stage, Tag
from gradalign.tracking import tag_filter

# Per-epoch metric keys the report reads (GAO runs add Metric.ALIGNMENT_PREFIX + <param>).
EPOCH_METRICS = (Metric.TRAIN_LOSS, Metric.VAL_LOSS, Metric.VAL_ACC, Metric.TEST_ACC)


# What became of a sweep run, as SweepChoice.counts counts them; only "finished" ones are chosen.
RUN_STATES = ("finished", "pruned", "failed", "killed", "unfinished", "no metric")


class MissingSweepError(UserError, LookupError):
    """An optimizer has no usable sweep run; the message names the command that makes one."""


@dataclasses.dataclass(frozen=True)
class SweepChoice:
    """The best sweep run of one optimizer, and what the search over its runs found.

    ``counts``: sweep runs with this configuration by state (``finished`` runs with a finite
    metric are the candidates; ``pruned`` (stopped early by the sweep's pruner, so not trained
    for the budget the others were), ``failed``, ``killed``, ``unfinished`` and ``no metric``
    are skipped); ``other_settings``: sweep runs of this optimizer made with other settings;
    ``seconds_per_epoch``: the best run's wall time per epoch, all overheads included;
    ``seeds``: the best run's (seed.model, seed.data).
    """

    optimizer: str
    run_id: str
    value: float
    params: dict[str, str]
    counts: dict[str, int]
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


def _state(run: Run, metric: str) -> str:
    """What became of a sweep run: one of RUN_STATES."""
    status = run.info.status
    if status == "FINISHED" and run.data.tags.get(Tag.PRUNED) == "true":
        return "pruned"
    if status == "FINISHED":
        value = run.data.metrics.get(metric)
        return "finished" if value is not None and math.isfinite(value) else "no metric"
    return {"FAILED": "failed", "KILLED": "killed"}.get(status, "unfinished")


def best_sweep_run(
    client: MlflowClient,
    experiment_id: str,
    optimizer: str,
    context: Mapping[str, str],
    *,
    metric: str,
    direction: str,
    overrides: Sequence[str] = (),
    sweep_id: str | None = None,
) -> SweepChoice:
    """The FINISHED, unpruned sweep run of ``optimizer`` with a finite ``metric``, best in
    ``direction``, among the runs whose settings match ``context`` (see configs.run_context),
    and of sweep ``sweep_id`` only when one is given (a study's own sweep).

    Ties go to the earliest run. Raises MissingSweepError (naming the sweep command, and the
    settings in which other sweeps of the optimizer differ) when there is no candidate.
    """
    counts: collections.Counter[str] = collections.Counter()
    candidates: list[Run] = []
    differing: set[str] = set()
    other = 0
    tags = {Tag.STAGE: Stage.SWEEP, Tag.OPTIMIZER: optimizer}
    if sweep_id is not None:
        tags[Tag.SWEEP_ID] = sweep_id
    filter_string = tag_filter(tags)
    for run in search(client, experiment_id, filter_string):
        settings = run_context(run.data.params)
        if settings != context:
            other += 1
            differing |= {
                k for k in set(settings) | set(context) if settings.get(k) != context.get(k)
            }
            continue
        state = _state(run, metric)
        counts[state] += 1
        if state == "finished":
            candidates.append(run)
    if not candidates:
        found = (
            f"{sum(counts.values())} sweep run(s), none FINISHED unpruned with a finite {metric!r}"
        )
        if other:
            found += f"; {other} more made with other settings (differing in {sorted(differing)})"
        raise MissingSweepError(
            f"no usable sweep of optimizer {optimizer!r} ({found}). "
            f"Make one with: {shlex.join(sweep_command(optimizer, overrides))}"
        )
    sign = 1 if direction == "minimize" else -1
    best = min(candidates, key=lambda r: (sign * r.data.metrics[metric], r.info.start_time))
    return SweepChoice(
        optimizer=optimizer,
        run_id=best.info.run_id,
        value=best.data.metrics[metric],
        params=optimizer_params(best.data.params),
        counts={key: counts[key] for key in RUN_STATES},
        other_settings=other,
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
