"""What a person reads of the pipeline's runs in MLflow's UI: run names, values written short,
links into the UI, and the saved views of the runs table.

MLflow 3.17's UI opens an experiment on its GenAI overview unless the link asks for the runs
(``workflowType=machine_learning``; the experiment's kind tag is not consulted) or the browser
remembers the "Model training" switch; its runs table shows only the columns a view selects,
and a view can be stored on the experiment (tag ``mlflow.sharedViewState.<key>``) and opened by
a link (``viewStateShareKey=<key>``). A view holds the table's columns and their widths, the
filter and order, the grouping, which runs the charts draw (``runsHiddenMode``: the first 10
by default) and the chart view's sections and charts (``compareRunSections``,
``compareRunCharts``; charts MLflow makes for the other metrics are added after them).
docs/tracking.md lists what the pipeline stores; docs/mlflow-ui.md shows it page by page.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from gradalign.schema import Metric, MlflowTag, Stage, Tag

# The runs table of a first-time visitor, whatever the experiment's kind.
WORKFLOW = {"workflowType": "machine_learning"}
# What the UI's kind selector writes for a model-training experiment.
EXPERIMENT_KIND = "custom_model_development"
# The runs table's name column: wide enough for the names that carry a sweep's best values.
NAME_COLUMN = "attributes.`Run Name`"
NAME_WIDTH = 480
# Saved views every experiment gets: all its runs (where the printed links of python -m
# gradalign.ui land), its sweeps by best objective, its reports with their verdicts.
RUNS_VIEW, SWEEPS_VIEW, REPORTS_VIEW = "runs", "sweeps", "reports"
EXPERIMENT_NOTE = f"""Optimizer comparisons tracked by gradalign (train.py, report.py, study.py).

**Start here:** the *Views* menu at the top right of the runs table: "All runs" (each run's
objective, best val loss and searched values; a sweep's trials under its [+]), "Sweeps: best
objective of each", "Reports: verdicts" (each comparison's effect, CI and p), and for each sweep
its trials sorted by objective, for each report its final runs grouped by optimizer (the chart
view then opens on the verdict's outcome, each optimizer's mean curve and range).
Runs by tag `{Tag.STAGE}`: `{Stage.SWEEP_PARENT}` (a sweep: its best trial and optimisation
history in its description), `{Stage.SWEEP}` (a trial, nested under its sweep), `{Stage.REPORT}`
(a comparison: the verdict in its description), `{Stage.FINAL}` (a report's retraining of a
best configuration for one seed), `{Stage.SINGLE}` (`python train.py`)."""


def short_value(value: Any) -> str:
    """``value`` as a run name shows it: floats to 3 significant digits, small and large ones
    as ``2.06e-3``; anything else as it is."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if value == 0 or not math.isfinite(value) or 1e-2 <= abs(value) < 1e4:
        return f"{value:.3g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def short_key(key: str) -> str:
    """A config key as a run name shows it: ``optimizer.lr`` -> ``lr``; others in full."""
    return key.removeprefix("optimizer.")


def values_text(values: Mapping[str, Any]) -> str:
    """``lr=2.06e-3 beta=0.945`` for {"optimizer.lr": 0.00206, "optimizer.beta": 0.945}."""
    return " ".join(f"{short_key(k)}={short_value(v)}" for k, v in values.items())


def run_name(optimizer: str, values: Mapping[str, Any], detail: str) -> str:
    """``gao lr=2.06e-3 beta=0.945 (trial 7)``: the optimizer, its searched values, then what
    the run is (``detail``)."""
    text = values_text(values)
    return f"{optimizer} {text} ({detail})" if text else f"{optimizer} ({detail})"


def _query(params: Mapping[str, str]) -> str:
    return urllib.parse.urlencode({**WORKFLOW, **params}, quote_via=urllib.parse.quote)


def runs_link(base: str, experiment_id: str, view: str | None = None, charts: bool = False) -> str:
    """The experiment's runs table; with ``view``, as the saved view of that key shows it; with
    ``charts``, in the chart view. An empty ``base`` gives a link relative to the UI, for a
    description (the UI shows it at its own address, whatever the host)."""
    params = {"viewStateShareKey": view} if view else {}
    if charts:
        params["compareRunsMode"] = "CHART"
    return f"{base}/#/experiments/{experiment_id}/runs?{_query(params)}".removeprefix("/")


def run_link(base: str, experiment_id: str, run_id: str) -> str:
    """A run's page (relative to the UI for an empty ``base``)."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{_query({})}".removeprefix("/")


def artifact_image(run_id: str, path: str, alt: str) -> str:
    """Markdown that shows the image artifact ``path`` of run ``run_id`` inline in a run's
    description (a link relative to the UI; the artifact viewer itself shows no images in
    markdown)."""
    query = urllib.parse.urlencode({"path": path, "run_uuid": run_id})
    return f"![{alt}](get-artifact?{query})"


def column(kind: str, key: str) -> str:
    """A runs-table column: ``column("metrics", "objective")`` -> metrics.`objective`."""
    return f"{kind}.`{key}`"


# Columns whose values are longer than their names: the start of the column's name -> pixels.
VALUE_WIDTHS = {
    column("tags", Tag.VERDICT_PREFIX)[:-1]: 720,  # a sentence
    column("tags", Tag.CI_PREFIX)[:-1]: 220,  # [-0.04388, -0.01612] (95%)
    column("attributes", "Description"): 420,
}


def column_width(name: str) -> int:
    """Pixels that show column ``name`` whole: its header (metrics.`gao/best_val_loss/p_t`;
    MLflow's own width, 100, cuts longer keys), or its value (VALUE_WIDTHS)."""
    for start, width in VALUE_WIDTHS.items():
        if name.startswith(start):
            return width
    key = name.partition(".")[2].strip("`")
    return max(100, 8 * len(key) + 40)


# A chart of the chart view, as MLflow stores it (its RunsCharts*CardConfig classes, with their
# defaults): built by line_chart, bar_chart or parallel_chart.
Chart = dict[str, Any]


def line_chart(metric: str) -> Chart:
    """The curve of ``metric`` over epochs (with runs grouped: each group's mean and range)."""
    return {
        "type": "LINE",
        "metricKey": metric,
        "displayName": metric,
        "lineSmoothness": 0,
        "xAxisScaleType": "linear",
        "scaleType": "linear",
        "range": {"xMin": None, "xMax": None, "yMin": None, "yMax": None},
        "xAxisKey": "step",
        "selectedXAxisMetricKey": "",
        "yAxisKey": "metric",
        "yAxisExpressions": [],
        "ignoreOutliers": False,
        "useGlobalXaxisKey": True,
        "useGlobalLineSmoothing": True,
    }


def bar_chart(metric: str) -> Chart:
    """One bar per run (per group: its mean) of the latest value of ``metric``."""
    return {"type": "BAR", "metricKey": metric, "displayName": metric}


def parallel_chart(params: Sequence[str], metrics: Sequence[str]) -> Chart:
    """Parallel coordinates of ``params`` and ``metrics``, one line per run: every run the
    table lists, not only the runs visible in the charts (MLflow's default is the first 10)."""
    return {
        "type": "PARALLEL",
        "selectedParams": list(params),
        "selectedMetrics": list(metrics),
        "showAllRuns": True,
    }


@dataclasses.dataclass(frozen=True)
class ChartSection:
    """A section of the chart view: its title, its charts (in order; an empty section is a
    place for the charts MLflow makes of the metrics whose key starts with ``<name>/``), how
    many charts a row holds and how high they are."""

    name: str
    charts: tuple[Chart, ...] = ()
    columns: int = 3
    height: int = 360


def _chart_state(sections: Sequence[ChartSection]) -> dict[str, Any]:
    """The view state that opens the chart view on ``sections``, in this order, before the
    sections MLflow adds for the other metrics."""
    configs, charts = [], []
    for number, section in enumerate(sections):
        uuid = f"section-{number}"
        configs.append(
            {
                "uuid": uuid,
                "name": section.name,
                "display": True,
                "isReordered": True,  # MLflow appends the charts it makes, after these
                "deleted": False,
                "columns": section.columns,
                "cardHeight": section.height,
            }
        )
        for index, chart in enumerate(section.charts):
            charts.append(
                {
                    "uuid": f"{uuid}-chart-{index}",
                    "runsCountToCompare": 10,
                    "metricSectionId": uuid,
                    "deleted": False,
                    "isGenerated": False,
                    **chart,
                }
            )
    return {"compareRunSections": configs, "compareRunCharts": charts, "isAccordionReordered": True}


def view_tag(
    key: str,
    name: str,
    *,
    search_filter: str,
    columns: Sequence[str],
    order_by: str | None = None,
    ascending: bool = True,
    group_by_tag: str | None = None,
    sections: Sequence[ChartSection] = (),
    all_runs_in_charts: bool = False,
) -> tuple[str, str]:
    """The experiment tag (key, value) of a saved runs-table view named ``name``, opened by
    ``runs_link(..., view=key)`` and listed in the UI's "Views" menu: the runs matching
    ``search_filter``, with ``columns`` shown (the run names and the columns wide enough to
    read), sorted by ``order_by``, grouped by the values of tag ``group_by_tag`` (the charts
    then show each group's mean and range); its chart view opens on ``sections`` and draws
    every listed run when ``all_runs_in_charts`` (else MLflow's first 10)."""
    shown = list(dict.fromkeys(columns))
    state: dict[str, Any] = {
        "searchFilter": search_filter,
        "orderByKey": order_by or "attributes.start_time",
        "orderByAsc": ascending if order_by else False,
        "selectedColumns": shown,
        "columnOrder": [NAME_COLUMN, *shown],
        "columnWidths": {NAME_COLUMN: NAME_WIDTH, **{c: column_width(c) for c in shown}},
        "runListHidden": False,
    }
    if all_runs_in_charts:
        state["runsHiddenMode"] = "SHOW_ALL"
    if sections:
        state |= _chart_state(sections)
    if group_by_tag is not None:
        state["groupBy"] = {
            "aggregateFunction": "average",
            "groupByKeys": [{"mode": "tag", "groupByData": group_by_tag}],
        }
        state["groupsExpanded"] = {}
    now = int(time.time() * 1000)
    envelope = {"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    return f"{MlflowTag.SHARED_VIEW_PREFIX}{key}", json.dumps(envelope)


def widened(value: str, columns: Sequence[str]) -> str | None:
    """The saved view ``value`` (a view_tag value) with ``columns`` it lacks appended, or None
    when it has them all; its other columns, a person's among them, stay as they are."""
    envelope = json.loads(value)
    state = json.loads(envelope["state"])
    missing = [c for c in dict.fromkeys(columns) if c not in state.get("selectedColumns", [])]
    if not missing:
        return None
    selected = state.get("selectedColumns", [])
    order = state.get("columnOrder") or [NAME_COLUMN, *selected]  # MLflow sizes ordered ones
    state["selectedColumns"] = [*selected, *missing]
    state["columnOrder"] = [*order, *missing]
    state["columnWidths"] = {
        **state.get("columnWidths", {}),
        **{c: column_width(c) for c in missing},
    }
    envelope["state"] = json.dumps(state)
    envelope["updatedAt"] = int(time.time() * 1000)
    return json.dumps(envelope)


def widen_view(client: Any, experiment_id: str, key: str, columns: Sequence[str]) -> None:
    """Add ``columns`` to the experiment's saved view ``key`` (RUNS_VIEW, REPORTS_VIEW): its
    columns grow with what the experiment holds (a sweep's searched values, a report's
    comparisons). Two processes widening at once may lose one's columns until its next write."""
    tag = f"{MlflowTag.SHARED_VIEW_PREFIX}{key}"
    current = client.get_experiment(experiment_id).tags.get(tag)
    if current is None:
        current = experiment_tags()[tag]
    value = widened(current, columns)
    if value is not None:
        client.set_experiment_tag(experiment_id, tag, value)


def verdict_columns(optimizer: str, outcome: str) -> list[str]:
    """The Reports view's columns of one comparison: the effect on the verdict's ``outcome``
    (the mean paired difference, optimizer - baseline), its confidence interval, the p it rests
    on, and the verdict's sentence (the report run's metrics and tags)."""
    return [
        column("metrics", f"{optimizer}/{outcome}/mean_diff"),
        column("tags", f"{Tag.CI_PREFIX}{optimizer}"),
        column("metrics", f"{optimizer}/{outcome}/{Metric.DECIDING_P}"),
        column("tags", f"{Tag.VERDICT_PREFIX}{optimizer}"),
    ]


def experiment_tags() -> dict[str, str]:
    """The tags of an experiment the pipeline writes to: its kind (what the UI's kind selector
    writes for model training), the description above its runs table, and the saved views of
    all its runs, its sweeps and its reports (the columns of a sweep's searched values and of a
    report's comparisons are added as they come: widen_view)."""
    optimizer = column("tags", Tag.OPTIMIZER)
    runs = view_tag(
        RUNS_VIEW,
        "All runs: objective, best val loss, searched values",
        search_filter="",
        columns=[
            optimizer,
            column("metrics", Metric.OBJECTIVE),
            column("metrics", Metric.BEST_OBJECTIVE),
            column("metrics", Metric.BEST_VAL_LOSS),
            column("params", "optimizer.lr"),
        ],
    )
    counts = (Metric.TRIALS_COMPLETE, Metric.TRIALS_DIVERGED, Metric.TRIALS_FAILED)
    sweeps = view_tag(
        SWEEPS_VIEW,
        f"Sweeps: best {Metric.OBJECTIVE} of each",
        search_filter=f"tags.{Tag.STAGE} = '{Stage.SWEEP_PARENT}'",
        columns=[
            column("metrics", Metric.BEST_OBJECTIVE),
            *(column("metrics", key) for key in (*counts, Metric.TRIALS_PRUNED)),
            optimizer,
        ],
        order_by=column("metrics", Metric.BEST_OBJECTIVE),
    )
    reports = view_tag(
        REPORTS_VIEW,
        "Reports: verdicts",
        search_filter=f"tags.{Tag.STAGE} = '{Stage.REPORT}'",
        columns=[column("tags", Tag.OPTIMIZERS), column("tags", Tag.SMOKE_RUN)],
    )
    return {
        MlflowTag.EXPERIMENT_KIND: EXPERIMENT_KIND,
        MlflowTag.NOTE: EXPERIMENT_NOTE,
        **dict([runs, sweeps, reports]),
    }
