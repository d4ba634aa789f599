"""Shared fixtures: composed configs, and a temporary MLflow store and data cache for the whole
session, so tests never write to the repository's mlruns/ or .cache/."""

import os

import pytest
from helpers import REPO_ROOT, compose_config

from gradalign.config import register_resolvers

register_resolvers(REPO_ROOT)


@pytest.fixture(scope="session", autouse=True)
def mlflow_uri(tmp_path_factory):
    """A session-wide SQLite MLflow store, exported as MLFLOW_TRACKING_URI (subprocesses too)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if previous is None:
        del os.environ["MLFLOW_TRACKING_URI"]
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Overrides for a run of seconds: 2 epochs on 1000 samples, data cached in a temp dir."""
    cache = tmp_path_factory.mktemp("data")
    return ["trainer.epochs=2", "dataset.generation.num_samples=1000", f"paths.data_cache={cache}"]


@pytest.fixture
def compose_cfg():
    """compose_cfg(*overrides, hydra=False): conf/config.yaml composed as train.py would."""
    return compose_config
