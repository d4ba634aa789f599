"""conf/: every group combination composes, each optimizer carries its own search space, the
defaults are the seed study's, bad values fail early, and paths are anchored at the repo root."""

import itertools
import os
import re
from pathlib import Path

import pytest
import torch
from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
from omegaconf import OmegaConf
from optuna.distributions import LogUniformDistribution, UniformDistribution

from gradalign import GradientAlignmentOptimizer
from gradalign.config import config_hash, flatten, validate
from gradalign.experiment import build_optimizer
from gradalign.tracking import tracking_uri

REPO_ROOT = Path(__file__).resolve().parents[1]


def options(group):
    return sorted(p.stem for p in (REPO_ROOT / "conf" / group).glob("*.yaml"))


# The searched keys of the optimizers; GAO variants (gao_*.yaml) inherit gao's.
SEARCHED = {
    "adam": {"optimizer.lr"},
    "gao": {"optimizer.lr", "optimizer.beta"},
    "adamw": {"optimizer.lr", "optimizer.weight_decay"},
    "sgd": {"optimizer.lr", "optimizer.momentum"},
}


def searched(optimizer):
    return SEARCHED["gao" if optimizer.startswith("gao_") else optimizer]


def search_space(cfg):
    """The optuna distributions the sweeper would build from hydra.sweeper.params."""
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    distributions, fixed = create_params_from_overrides(params)
    assert not fixed
    return distributions


def test_groups_have_the_expected_options():
    assert options("dataset") == ["mnist1d", "mnist1d_shuffled"]
    assert options("model") == ["cnn", "mlp"]
    assert options("parallel") == ["joblib", "serial", "slurm", "submitit_local"]
    assert set(options("optimizer")) >= set(SEARCHED)


@pytest.mark.parametrize(
    "dataset,model,optimizer",
    list(itertools.product(options("dataset"), options("model"), options("optimizer"))),
)
def test_every_combination_composes_with_its_optimizers_search_space(
    compose_cfg, dataset, model, optimizer
):
    cfg = compose_cfg(f"dataset={dataset}", f"model={model}", f"optimizer={optimizer}", hydra=True)
    assert (cfg.dataset.name, cfg.model.name, cfg.optimizer.name) == (dataset, model, optimizer)
    validate(cfg)
    space = search_space(cfg)
    assert set(space) == searched(optimizer)
    assert isinstance(space["optimizer.lr"], LogUniformDistribution)
    for key, distribution in space.items():  # the searched keys exist and their default is inside
        default = OmegaConf.select(cfg, key)
        assert distribution.low <= default <= distribution.high, key


def test_defaults_are_the_seed_study(compose_cfg):
    cfg = compose_cfg(hydra=True)
    assert (cfg.dataset.name, cfg.model.name, cfg.optimizer.name) == ("mnist1d", "mlp", "adam")
    assert list(cfg.model.hidden) == [100, 100] and cfg.model.residual is True
    assert (cfg.trainer.epochs, cfg.trainer.batch_size) == (25, 100)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.sampler._target_ == "gradalign.sampler.ResumableTPESampler"
    assert isinstance(sweeper.sampler.seed, int)
    assert (sweeper.n_trials, sweeper.direction) == (30, "minimize")


LAUNCHERS = {
    "serial": "BasicLauncher",
    "joblib": "JoblibLauncher",
    "submitit_local": "LocalLauncher",
    "slurm": "SlurmLauncher",
}


@pytest.mark.parametrize("preset", sorted(LAUNCHERS))
def test_parallel_presets_size_the_launcher_and_optuna_batches_together(compose_cfg, preset):
    cfg = compose_cfg(f"parallel={preset}", hydra=True)
    launcher, sweeper = cfg.hydra.launcher, cfg.hydra.sweeper
    assert launcher._target_.endswith(LAUNCHERS[preset])
    workers = cfg.parallel.workers
    assert sweeper.n_jobs == workers and cfg.trainer.threads == 1
    if preset == "serial":
        assert workers == 1
    elif preset == "slurm":
        assert launcher.array_parallelism == workers and launcher.cpus_per_task == 1
    else:  # one worker per core this process may use, unless told otherwise
        assert workers == len(os.sched_getaffinity(0))
    if preset == "joblib":
        assert launcher.n_jobs == workers
        resized = compose_cfg("parallel=joblib", "parallel.workers=5", hydra=True)
        assert resized.hydra.launcher.n_jobs == resized.hydra.sweeper.n_jobs == 5


def test_basic_sweeper_replaces_optuna_for_grids(compose_cfg):
    cfg = compose_cfg("hydra/sweeper=basic", "hydra.sweeper.params=null", hydra=True)
    assert cfg.hydra.sweeper._target_.endswith("BasicSweeper")
    assert cfg.hydra.sweeper.params is None


def test_gao_searches_log_lr_and_beta_below_one(compose_cfg):
    space = search_space(compose_cfg("optimizer=gao", hydra=True))
    assert isinstance(space["optimizer.lr"], LogUniformDistribution)
    assert isinstance(space["optimizer.beta"], UniformDistribution)
    assert 0 <= space["optimizer.beta"].low < space["optimizer.beta"].high < 1


def test_adam_searches_only_log_lr(compose_cfg):
    space = search_space(compose_cfg("optimizer=adam", hydra=True))
    assert list(space) == ["optimizer.lr"]
    assert isinstance(space["optimizer.lr"], LogUniformDistribution)


def test_shuffled_dataset_differs_only_by_name_and_shuffle(compose_cfg):
    plain = flatten(compose_cfg().dataset)
    shuffled = flatten(compose_cfg("dataset=mnist1d_shuffled").dataset)
    differing = {k for k in plain.keys() | shuffled.keys() if plain.get(k) != shuffled.get(k)}
    assert differing == {"name", "generation.shuffle_seq"}
    assert shuffled["generation.shuffle_seq"] is True


def test_common_overrides(compose_cfg):
    cfg = compose_cfg(
        "optimizer=gao", "optimizer.beta=0.9", "trainer.epochs=100", "seed.model=3",
        "dataset.generation.num_samples=1000", "dataset.generation.seed=7",
    )
    assert (cfg.optimizer.beta, cfg.trainer.epochs) == (0.9, 100)
    assert (cfg.seed.model, cfg.seed.data) == (3, 0)
    assert (cfg.dataset.generation.num_samples, cfg.dataset.generation.seed) == (1000, 7)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["optimizer.lr=0"], "optimizer.lr"),
        (["optimizer.lr=-1e-3"], "optimizer.lr"),
        (["optimizer=gao", "optimizer.lr=0"], "optimizer.lr"),
        (["optimizer=gao", "optimizer.beta=1.0"], "optimizer.beta"),
        (["optimizer=gao", "optimizer.beta=-0.1"], "optimizer.beta"),
        (["trainer.epochs=0"], "trainer.epochs"),
        (["trainer.epochs=2.5"], "trainer.epochs"),
        (["trainer.batch_size=0"], "trainer.batch_size"),
        (["trainer.device=tpu"], "trainer.device"),
        (["trainer.threads=0"], "trainer.threads"),
        (["objective=worst"], "objective"),
        (["dataset.val_fraction=1.0"], "dataset.val_fraction"),
        (["parallel=joblib", "parallel.workers=0"], "parallel.workers"),
        (["tracking.optuna_trial=-1"], "tracking.optuna_trial"),
    ],
)
def test_bad_values_name_the_key_value_and_what_is_allowed(compose_cfg, overrides, key):
    cfg = compose_cfg(*overrides)
    with pytest.raises(ValueError, match=rf"{re.escape(key)}=\S+: must be "):
        validate(cfg)


def test_paths_are_anchored_at_the_repo_root_whatever_the_cwd(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg(hydra=True)
    assert cfg.paths.root == str(REPO_ROOT)
    assert cfg.hydra.run.dir.startswith(f"{REPO_ROOT}/outputs/")
    assert cfg.hydra.sweep.dir.startswith(f"{REPO_ROOT}/outputs/")
    assert cfg.paths.data_cache == f"{REPO_ROOT}/.cache/data"
    assert cfg.tracking.default_uri == f"sqlite:///{REPO_ROOT}/mlruns/mlflow.db"


def test_tracking_uri_prefers_config_then_environment_then_default(monkeypatch):
    tracking = OmegaConf.create({"uri": None, "default_uri": "sqlite:///default.db"})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tracking) == "sqlite:///default.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert tracking_uri(tracking) == "http://server:5000"
    tracking.uri = "sqlite:///explicit.db"
    assert tracking_uri(tracking) == "sqlite:///explicit.db"


def test_params_are_the_flattened_config_without_paths_and_tracking(compose_cfg):
    params = flatten(compose_cfg("optimizer=gao"))
    assert params["model.hidden"] == [100, 100]
    assert params["optimizer.beta"] == 0.9 and params["seed.model"] == 0
    assert params["dataset.generation.num_samples"] == 5000
    assert not [k for k in params if k.startswith(("paths.", "tracking.", "parallel."))]


def test_config_hash_ignores_seeds_and_where_things_go_but_not_what_is_computed(compose_cfg):
    base = config_hash(compose_cfg())
    same = ["seed.model=3", "seed.data=4", "tracking.experiment=x", "trainer.threads=1",
            "trainer.device=cpu", "paths.data_cache=/elsewhere", "parallel=joblib",
            "tracking.optuna_trial=5"]
    for override in same:
        assert config_hash(compose_cfg(override)) == base, override
    for override in ["optimizer.lr=0.1", "model=cnn", "trainer.epochs=3", "optimizer=gao"]:
        assert config_hash(compose_cfg(override)) != base, override


@pytest.mark.parametrize("name", options("optimizer"))
def test_build_optimizer_passes_every_setting(compose_cfg, name):
    cfg = compose_cfg(f"optimizer={name}")
    optimizer = build_optimizer(cfg.optimizer, torch.nn.Linear(3, 2).parameters())
    group = optimizer.param_groups[0]
    for key, value in cfg.optimizer.items():
        if key in group:
            assert group[key] == value, key
    assert group["lr"] == cfg.optimizer.lr
    if name.startswith("gao"):
        assert isinstance(optimizer, GradientAlignmentOptimizer)
        assert isinstance(optimizer.base, torch.optim.Adam)
        assert (optimizer.beta, optimizer.target, optimizer.granularity, optimizer.min_scale) == (
            cfg.optimizer.beta, cfg.optimizer.target, cfg.optimizer.granularity,
            cfg.optimizer.min_scale,
        )
    else:
        assert type(optimizer).__name__.lower() == name
