"""Tracking in MLflow: ``store`` reaches the store (which one, a client that survives a busy
SQLite file, probes of a server), ``runs`` writes the pipeline's runs on it (one per job, a
parent per sweep, an end status whatever happens). The names of what is written are
gradalign.schema's."""

from gradalign.tracking.labels import run_link, run_name, runs_link
from gradalign.tracking.runs import (
    DatasetRecord,
    Run,
    Terminated,
    close_sweep_parent,
    failure_reason,
    find_sweep_parent,
    interruption_reason,
    open_sweep_parent,
    sigterm_raises,
    start_run,
)
from gradalign.tracking.store import (
    Store,
    TrackingUnavailable,
    client,
    connect,
    log_batch,
    quoted,
    serve_command,
    tag_filter,
    tracking_uri,
    ui_url,
)

__all__ = [
    "DatasetRecord",
    "Run",
    "Terminated",
    "TrackingUnavailable",
    "client",
    "connect",
    "failure_reason",
    "interruption_reason",
    "find_sweep_parent",
    "log_batch",
    "quoted",
    "run_link",
    "run_name",
    "runs_link",
    "serve_command",
    "sigterm_raises",
    "start_run",
    "Store",
    "close_sweep_parent",
    "open_sweep_parent",
    "tag_filter",
    "tracking_uri",
    "ui_url",
]
