"""What a person reads of the pipeline's runs in MLflow's UI: run names, values written short,
links into the UI, and the saved views of the runs table.

MLflow 3.17's UI opens an experiment on its GenAI overview unless the link asks for the runs
(``workflowType=machine_learning``); its runs table shows only the columns a view selects, and
a view can be stored on the experiment (tag ``mlflow.sharedViewState.<key>``) and opened by a
link (``viewStateShareKey=<key>``). docs/tracking.md lists what the pipeline stores.
"""

from __future__ import annotations

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
EXPERIMENT_NOTE = f"""Optimizer comparisons tracked by gradalign (train.py, report.py, study.py).

**Start here:** the *Views* menu at the top right of the runs table: "Sweeps: best objective of
each", "Reports: verdicts", and for each sweep its trials sorted by objective, for each report
its final runs grouped by optimizer (the chart view then draws each optimizer's mean curve).
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


def view_tag(
    key: str,
    name: str,
    *,
    search_filter: str,
    columns: Sequence[str],
    order_by: str | None = None,
    ascending: bool = True,
    group_by_tag: str | None = None,
) -> tuple[str, str]:
    """The experiment tag (key, value) of a saved runs-table view named ``name``, opened by
    ``runs_link(..., view=key)`` and listed in the UI's "Views" menu: the runs matching
    ``search_filter``, with ``columns`` shown, sorted by ``order_by``, grouped by the values of
    tag ``group_by_tag`` (the charts then show each group's mean and range)."""
    state: dict[str, Any] = {
        "searchFilter": search_filter,
        "orderByKey": order_by or "attributes.start_time",
        "orderByAsc": ascending if order_by else False,
        "selectedColumns": list(columns),
        "runListHidden": False,
    }
    if group_by_tag is not None:
        state["groupBy"] = {
            "aggregateFunction": "average",
            "groupByKeys": [{"mode": "tag", "groupByData": group_by_tag}],
        }
        state["groupsExpanded"] = {}
    now = int(time.time() * 1000)
    envelope = {"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    return f"{MlflowTag.SHARED_VIEW_PREFIX}{key}", json.dumps(envelope)


# Saved views every experiment gets: its sweeps by best objective, its reports.
SWEEPS_VIEW, REPORTS_VIEW = "sweeps", "reports"


def experiment_tags() -> dict[str, str]:
    """The tags of an experiment the pipeline writes to: its kind (what the UI's kind selector
    writes for model training), the description above its runs table, and the saved views of
    its sweeps and reports."""
    description = column("attributes", "Description")
    counts = (Metric.TRIALS_COMPLETE, Metric.TRIALS_DIVERGED, Metric.TRIALS_FAILED)
    sweeps = view_tag(
        SWEEPS_VIEW,
        f"Sweeps: best {Metric.OBJECTIVE} of each",
        search_filter=f"tags.{Tag.STAGE} = '{Stage.SWEEP_PARENT}'",
        columns=[
            description,
            column("metrics", Metric.BEST_OBJECTIVE),
            *(column("metrics", key) for key in (*counts, Metric.TRIALS_PRUNED)),
            column("tags", Tag.OPTIMIZER),
        ],
        order_by=column("metrics", Metric.BEST_OBJECTIVE),
    )
    reports = view_tag(
        REPORTS_VIEW,
        "Reports: verdicts",
        search_filter=f"tags.{Tag.STAGE} = '{Stage.REPORT}'",
        columns=[description, column("tags", Tag.OPTIMIZERS)],
    )
    return {
        MlflowTag.EXPERIMENT_KIND: EXPERIMENT_KIND,
        MlflowTag.NOTE: EXPERIMENT_NOTE,
        **dict([sweeps, reports]),
    }
