"""What several test modules share: where the repository and its conf/ are, the options of a
config group as conf/ has them, a free local port, composing a config as train.py does, and
reading MLflow runs."""

from __future__ import annotations

import re
import runpy
import socket
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from gradalign.hydra_compat import VERSION_BASE
from gradalign.schema import Metric
from gradalign.training import EpochMetrics

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF = REPO_ROOT / "conf"
TRAIN = [sys.executable, str(REPO_ROOT / "train.py")]
EXPERIMENT = OmegaConf.load(CONF / "config.yaml").tracking.experiment
# What no view of a smoke run may say: the words of a verdict ("val loss" is not one; a loss as
# a suite's result is, counted or in a table cell).
SIGNIFICANCE = re.compile(
    r"significan|\bholds\b|contradicted|not shown|\bpartly\b|\bwins?\b|\bties?\b|\blosses\b"
    r"|\| loss \||\d loss\b"
)


def epoch_metrics(n: int, val_loss: float, train_loss: float = 1.0) -> EpochMetrics:
    """Epoch ``n``'s metrics with every per-epoch key: the losses given, the others fixed."""
    values = dict.fromkeys(Metric.PER_EPOCH, 0.5)
    return EpochMetrics(n, {**values, Metric.TRAIN_LOSS: train_loss, Metric.VAL_LOSS: val_loss})


def scales(metrics: EpochMetrics) -> dict[str, float]:
    """An epoch's mean GAO scales by parameter name (its ``scale/<name>`` values)."""
    prefix = Metric.ALIGNMENT_PREFIX
    return {k.removeprefix(prefix): v for k, v in metrics.values.items() if k.startswith(prefix)}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no process listens on now (for a server a test starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def options(group: str) -> list[str]:
    """The options of config group ``group`` (conf/<group>/*.yaml), by name."""
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def compose_config(*overrides: str, hydra: bool = False) -> DictConfig:
    """conf/config.yaml composed with ``overrides``, as train.py composes it."""
    with initialize_config_dir(config_dir=str(CONF), **VERSION_BASE):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def train_in_process(monkeypatch, *argv: str) -> int:
    """``python train.py *argv`` in this process (so tests can patch it); its exit status."""
    monkeypatch.setattr(sys, "argv", [str(REPO_ROOT / "train.py"), *argv])
    try:
        runpy.run_path(str(REPO_ROOT / "train.py"), run_name="__main__")
    except SystemExit as exit_:
        return exit_.code
    return 0


def runs(uri: str, filter_string: str = "", experiment: str = EXPERIMENT) -> list:
    """Every run of ``experiment`` in the store at ``uri`` matching ``filter_string``, newest first
    ([] when the experiment does not exist)."""
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs(
        [found.experiment_id],
        filter_string,
        max_results=10000,
        order_by=["attributes.start_time DESC"],
    )


def asked_lrs(study_name: str, storage, sampler, n: int) -> list[float]:
    """Ask ``n`` trials of the stored study with ``sampler``, as a new sweep process would (each
    suggests an lr and is told it as its value); the suggested lrs."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
    values = []
    for _ in range(n):
        trial = study.ask()
        values.append(trial.suggest_float("lr", 1e-4, 1e-1, log=True))
        study.tell(trial, values[-1])
    return values
