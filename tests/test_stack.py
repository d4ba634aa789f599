"""The dependency stack under hydra-optuna-sweeper 1.3.0: every sampler choice builds for the
installed Optuna without a FutureWarning (motpe as TPE), the resumable TPE sampler keeps working
past its start-up trials, and stores written by an older MLflow or Optuna are refused with the
command that upgrades them instead of being migrated silently."""

import hashlib
import sqlite3
import warnings
from importlib import import_module

import optuna
import pytest
from helpers import asked_lrs
from hydra.core.config_store import ConfigStore
from mlflow.tracking import MlflowClient
from optuna.samplers import TPESampler

from gradalign import tracking
from gradalign.sweep.sampler import ResumableTPESampler, build_sampler
from gradalign.sweep.studies import check_storage

import_module("hydra_plugins.hydra_optuna_sweeper.config")  # registers the sampler choices
SAMPLERS = sorted(
    name.removesuffix(".yaml") for name in ConfigStore.instance().list("hydra/sweeper/sampler")
)


def first_values(sampler, n=3):
    """The first ``n`` values of x in [0, 1] that ``sampler`` asks for in a new study."""
    study = optuna.create_study(sampler=sampler)
    return [study.ask().suggest_float("x", 0, 1) for _ in range(n)]


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_choice_builds_without_a_future_warning(compose_cfg, name):
    """Each of hydra-optuna-sweeper's choices (1.3's, and 1.4's nsgaiii, gp and qmc): built
    without a deprecation, and seeded with the sweep's seed (1.4's nsgaii and nsgaiii are
    factory functions, whose signatures do not show the seed they pass on)."""
    cfg = compose_cfg(f"hydra/sweeper/sampler={name}", hydra=True)

    def build():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # not a change
            sampler = build_sampler(cfg.hydra.sweeper.sampler, seed=7)
        if name == "grid":  # the sweeper completes the partial with the search space
            sampler = sampler({"x": [0.25, 0.5, 0.75]})
        return sampler

    sampler = build()
    assert isinstance(sampler, optuna.samplers.BaseSampler)
    if name in ("tpe", "motpe"):  # Optuna >= 4 samples several objectives with TPE
        assert type(sampler) is ResumableTPESampler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        assert first_values(sampler) == first_values(build())


def test_the_sweeps_seed_is_the_samplers_unless_the_sampler_sets_its_own(compose_cfg):
    cfg = compose_cfg(hydra=True).hydra.sweeper.sampler
    assert cfg.seed is None  # conf/ seeds the sweep (hydra.sweeper.seed), not one sampler
    assert build_sampler(cfg, seed=3)._seed == 3
    assert build_sampler({**cfg, "seed": 5}, seed=3)._seed == 5


def test_a_resumed_study_samples_past_the_start_up_trials_without_repeating(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=storage)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = asked_lrs(
            "s", storage, ResumableTPESampler(seed=0), 15
        )  # past TPE's 10 start-up trials
        resumed = asked_lrs("s", storage, ResumableTPESampler(seed=0), 15)
    optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'plain.db'}")
    assert first == asked_lrs("s", f"sqlite:///{tmp_path / 'plain.db'}", TPESampler(seed=0), 15)
    assert not set(resumed) & set(first)


def age(db, revision):
    """Set the schema revision a SQLite store records, as an older library would have left it."""
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE alembic_version SET version_num = ?", (revision,))


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_mlflow_store_of_an_older_mlflow_is_refused_untouched(tmp_path):
    db = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()  # a store at the installed schema
    age(db, "b7e2c1a4d9f3")  # MLflow 3.16's head
    before = digest(db)
    with pytest.raises(tracking.TrackingUnavailable) as info:
        tracking.client(f"sqlite:///{db}", 60)
    message = str(info.value)
    assert "written by an older MLflow (schema b7e2c1a4d9f3" in message
    assert message.endswith(f"run: mlflow db upgrade sqlite:///{db}")
    assert digest(db) == before  # not migrated
    age(db, "f00f00f00f00")
    with pytest.raises(tracking.TrackingUnavailable, match="written by a newer MLflow"):
        tracking.client(f"sqlite:///{db}", 60)


def test_an_optuna_storage_of_an_older_optuna_is_refused_untouched(tmp_path):
    db = tmp_path / "optuna.db"
    url = f"sqlite:///{db}"
    optuna.create_study(storage=url)
    check_storage(url, 1.0)  # the installed schema: fine
    age(db, "v2.6.0.a")  # Optuna 2.10's
    before = digest(db)
    with pytest.raises(ValueError) as info:
        check_storage(url, 1.0)
    assert "written by an older Optuna (schema v2.6.0.a" in str(info.value)
    assert str(info.value).endswith(f"run: optuna storage upgrade --storage {url}")
    assert digest(db) == before


def test_an_mlflow_store_given_as_the_optuna_storage_is_named_as_such(tmp_path):
    db = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    with pytest.raises(ValueError, match=r"is not an Optuna storage \(it is an MLflow store\)"):
        check_storage(f"sqlite:///{db}", 1.0)
