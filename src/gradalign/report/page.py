"""The report as MLflow's UI shows it: the report run's description (the verdict first, the
figure inline), and its final runs findable and comparable by optimizer.

A final run is reused by later reports and nests under the report that trained it, so every
report tags each final run it used with ``reported_in/<report name>``; the report's saved view
of the runs table lists exactly those runs, grouped by optimizer, so that MLflow's charts show
each optimizer's mean curve and range over the seeds, the verdict's outcome first. The
experiment's "Reports" view gets the report's comparisons as columns: effect, CI, p, verdict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from mlflow.tracking import MlflowClient

from gradalign.report.finals import FinalResult
from gradalign.report.runs import SweepChoice
from gradalign.report.stats import Comparison, Verdict
from gradalign.schema import Metric, Tag
from gradalign.tracking import labels, log_batch, quoted


def view_key(report_name: str) -> str:
    """The key of the saved view of a report's final runs."""
    return f"report-{report_name}"


# The charts of each tested per-seed outcome (gradalign.report.stats.TESTED): the curve it is
# read from, and the outcome itself where the final runs log it.
OUTCOME_CHARTS = {
    "best_val_loss": (labels.line_chart(Metric.VAL_LOSS), labels.bar_chart(Metric.BEST_VAL_LOSS)),
    "final_val_loss": (labels.line_chart(Metric.VAL_LOSS),),
    "test_acc_at_best": (labels.line_chart(Metric.TEST_ACC),),
    "final_test_acc": (labels.line_chart(Metric.TEST_ACC),),
}


def save_view(
    client: MlflowClient,
    experiment_id: str,
    report_name: str,
    report_run_id: str,
    results: Sequence[FinalResult],
    searched: Sequence[str],
    primary: str,
) -> None:
    """Tag every final run the report used (trained or reused) as used by it, and store the
    saved view "Report <name>: final runs by optimizer" that lists exactly those on the
    experiment; its chart view opens on the verdict's outcome ``primary`` (then the loss and
    accuracy curves); and add the searched values to the experiment's view of all runs."""
    for result in results:
        tags = {f"{Tag.REPORTED_IN_PREFIX}{report_name}": report_run_id}
        log_batch(client, result.run_id, tags=tags)
    metrics = (Metric.BEST_VAL_LOSS, Metric.BEST_EPOCH, Metric.VAL_LOSS, Metric.TEST_ACC)
    params = [labels.column("params", key) for key in searched]
    first = labels.ChartSection(f"the verdict's outcome: {primary}", OUTCOME_CHARTS[primary], 2)
    tag, value = labels.view_tag(
        view_key(report_name),
        f"Report {report_name}: final runs by optimizer",
        search_filter=f"tags.`{Tag.REPORTED_IN_PREFIX}{report_name}` = {quoted(report_run_id)}",
        columns=[
            labels.column("tags", Tag.OPTIMIZER),
            *(labels.column("metrics", m) for m in metrics),
            *params,
            labels.column("params", "seed.model"),
        ],
        order_by=labels.column("metrics", Metric.BEST_VAL_LOSS),
        group_by_tag=Tag.OPTIMIZER,
        sections=[first, labels.ChartSection("loss"), labels.ChartSection("accuracy")],
    )
    client.set_experiment_tag(experiment_id, tag, value)
    labels.widen_view(client, experiment_id, labels.RUNS_VIEW, params)


def show_verdicts(
    client: MlflowClient,
    experiment_id: str,
    run_id: str,
    comparisons: Sequence[Comparison],
    primary: str,
    alpha: float,
) -> None:
    """Tag the report run with each verdict's confidence interval (``ci/<optimizer>``, the
    interval of the paired t test on ``primary``: "[-0.0439, -0.0161] (95%)"; a smoke run has
    none, as it has no p), and add the report's comparisons to the experiment's "Reports:
    verdicts" view: per challenger its effect, CI, p and verdict (labels.verdict_columns)."""
    tags = {}
    for comparison in comparisons:
        low, high = comparison.tests[primary].ci
        if comparison.verdict is not Verdict.SMOKE and math.isfinite(low + high):
            interval = f"[{low:+.4g}, {high:+.4g}] ({1 - alpha:.0%})"
            tags[f"{Tag.CI_PREFIX}{comparison.optimizer}"] = interval
    log_batch(client, run_id, tags=tags)
    columns = [
        column
        for comparison in comparisons
        for column in labels.verdict_columns(comparison.optimizer, primary)
    ]
    labels.widen_view(client, experiment_id, labels.REPORTS_VIEW, columns)


def description(
    *,
    run_id: str,
    experiment_id: str,
    title: str,
    comparisons: Sequence[Comparison],
    hyperparameters: Mapping[str, Mapping[str, str]],
    choices: Mapping[str, SweepChoice],
    figure: str,
    finals: int,
    trained: int,
    report_name: str,
) -> str:
    """The report run's description (markdown): the verdicts first, as plain sentences (MLflow
    shows the first lines before "Show more", and the runs table's Description column the
    first line's text), the compared configurations, the figure, where the rest is."""
    verdicts = [c.sentence for c in comparisons] or ["(no optimizer to compare)"]
    lines = [line for verdict in verdicts for line in ("", verdict)][1:]  # a paragraph each
    lines += [
        "",
        f"**{title}.**",
        "",
        "| optimizer | hyperparameters | best sweep run | tuned with |",
        "|---|---|---|---|",
    ]
    for name, values in hyperparameters.items():
        shown = labels.values_text({k: _number(v) for k, v in values.items()}) or "defaults"
        choice = choices[name]
        lines.append(f"| {name} | {shown} | `{choice.run_id}` | {choice.budget} |")
    charts = labels.runs_link("", experiment_id, view_key(report_name), charts=True)
    lines += [
        "",
        labels.artifact_image(run_id, figure, "convergence comparison"),
        "",
        f"[The {finals} final runs, grouped by optimizer]({charts}) ({trained} trained by this "
        f"report, {finals - trained} reused): the chart view draws each optimizer's mean curve "
        "and range over the seeds. The full report is `report.html` in Artifacts (`report.md` "
        "beside it, for reading outside MLflow).",
    ]
    return "\n".join(lines)


def _number(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value
