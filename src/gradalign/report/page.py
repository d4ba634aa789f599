"""The report as MLflow's UI shows it: the report run's description (the verdict first, the
figure inline), and its final runs findable and comparable by optimizer.

A final run is reused by later reports and nests under the report that trained it, so every
report tags each final run it used with ``reported_in/<report name>``; the report's saved view
of the runs table lists exactly those runs, grouped by optimizer, so that MLflow's charts show
each optimizer's mean curve and range over the seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mlflow.tracking import MlflowClient

from gradalign.report.finals import FinalResult
from gradalign.report.stats import Comparison
from gradalign.schema import Metric, Tag
from gradalign.tracking import labels, log_batch, quoted


def view_key(report_name: str) -> str:
    """The key of the saved view of a report's final runs."""
    return f"report-{report_name}"


def tag_finals(
    client: MlflowClient, results: Sequence[FinalResult], report_name: str, report_run_id: str
) -> None:
    """Tag every final run the report used (trained or reused) as used by it."""
    for result in results:
        tags = {f"{Tag.REPORTED_IN_PREFIX}{report_name}": report_run_id}
        log_batch(client, result.run_id, tags=tags)


def save_view(
    client: MlflowClient,
    experiment_id: str,
    report_name: str,
    report_run_id: str,
    searched: Sequence[str],
) -> None:
    """Store the saved view "Report <name>: final runs by optimizer" on the experiment."""
    metrics = (Metric.BEST_VAL_LOSS, Metric.BEST_EPOCH, Metric.VAL_LOSS, Metric.TEST_ACC)
    tag, value = labels.view_tag(
        view_key(report_name),
        f"Report {report_name}: final runs by optimizer",
        search_filter=f"tags.`{Tag.REPORTED_IN_PREFIX}{report_name}` = {quoted(report_run_id)}",
        columns=[
            *(labels.column("metrics", m) for m in metrics),
            *(labels.column("params", key) for key in searched),
            labels.column("params", "seed.model"),
        ],
        order_by=labels.column("metrics", Metric.BEST_VAL_LOSS),
        group_by_tag=Tag.OPTIMIZER,
    )
    client.set_experiment_tag(experiment_id, tag, value)


def description(
    *,
    run_id: str,
    experiment_id: str,
    title: str,
    comparisons: Sequence[Comparison],
    hyperparameters: Mapping[str, Mapping[str, str]],
    choices: Mapping[str, str],
    figure: str,
    finals: int,
    trained: int,
    report_name: str,
) -> str:
    """The report run's description (markdown): the verdicts first (MLflow shows the first
    lines before "Show more"), the compared configurations, the figure, where the rest is."""
    lines = [f"**{c.sentence}**" for c in comparisons] or ["**(no optimizer to compare)**"]
    lines += [
        "",
        f"{title}.",
        "",
        "| optimizer | hyperparameters | best sweep run |",
        "|---|---|---|",
    ]
    for name, values in hyperparameters.items():
        shown = labels.values_text({k: _number(v) for k, v in values.items()}) or "defaults"
        lines.append(f"| {name} | {shown} | `{choices[name]}` |")
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
