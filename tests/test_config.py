"""conf/: every option of every group composes, each optimizer carries its own search space over
keys that exist, the defaults are the seed study's, bad values of the keys no constructor sees
fail early, and paths are anchored at the repo root. The cases come from conf/ itself: adding an
option adds its cases, and no test lists the options."""

import os
import re
import warnings

import pytest
from helpers import CONF, REPO_ROOT, options, train_in_process
from omegaconf import OmegaConf
from optuna.distributions import FloatDistribution

from gradalign.config import (
    ConfigError,
    anchored_uri,
    config_hash,
    flatten,
    register_resolvers,
    validate,
)
from gradalign.sweep.search_space import parse
from gradalign.tracking import tracking_uri

# The config groups of conf/config.yaml's defaults list (experiment presets among them).
GROUPS = sorted(
    next(iter(entry))
    for entry in OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml").defaults)
    if isinstance(entry, dict) and not next(iter(entry)).startswith("override")
)


def search_space(cfg):
    """The optuna distributions the sweeper would build from hydra.sweeper.params."""
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.params or {}).items()]
    space = parse(params)
    distributions, fixed = space.distributions, space.fixed
    assert not fixed
    return distributions


@pytest.mark.parametrize(
    "group,option", [(group, option) for group in GROUPS for option in options(group)]
)
def test_every_option_of_every_group_composes_and_validates(compose_cfg, group, option):
    cfg = compose_cfg(f"{group}={option}", hydra=True)
    validate(cfg)
    node = OmegaConf.select(cfg, group)  # None for a preset (@package _global_)
    if node is not None and "_target_" in node:  # a component: named for tags after its file
        assert node.name == option


def test_resolvers_and_composition_warn_on_neither_hydra(compose_cfg):
    """gradalign.hydra_compat's spellings: Hydra 1.3 warns without version_base="1.3", Hydra 1.4
    with any version_base; OmegaConf 2.4 deprecates register_new_resolver, which 2.3 needs."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_resolvers(REPO_ROOT)
        cfg = compose_cfg("optimizer=gao", "scheduler=cosine")
        assert cfg.paths.data_cache == f"{REPO_ROOT.resolve()}/.cache/data"
        assert cfg.scheduler.T_max == cfg.trainer.epochs


@pytest.mark.parametrize("optimizer", options("optimizer"))
def test_every_search_space_key_exists_in_the_composed_config(compose_cfg, optimizer):
    cfg = compose_cfg(f"optimizer={optimizer}", hydra=True)
    space = search_space(cfg)
    assert space, f"conf/optimizer/{optimizer}.yaml has no search space (hydra.sweeper.params)"
    for key in space:
        assert OmegaConf.select(cfg, key, default=None) is not None, key


def test_defaults_are_the_seed_study(compose_cfg):
    cfg = compose_cfg(hydra=True)
    assert (cfg.dataset.name, cfg.model.name, cfg.optimizer.name) == ("mnist1d", "mlp", "adam")
    assert list(cfg.model.hidden) == [100, 100] and cfg.model.residual is True
    assert (cfg.trainer.epochs, cfg.trainer.batch_size) == (25, 100)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"  # built resumable
    assert isinstance(sweeper.seed, int)
    assert (sweeper.n_trials, sweeper.direction) == (30, "minimize")


@pytest.mark.parametrize("preset", options("parallel"))
def test_every_parallel_preset_sizes_optuna_batches_by_its_workers(compose_cfg, preset):
    cfg = compose_cfg(f"parallel={preset}", hydra=True)
    assert cfg.hydra.sweeper.n_jobs == cfg.parallel.workers >= 1
    assert cfg.trainer.threads == 1


LAUNCHERS = {
    "serial": "BasicLauncher",
    "joblib": "JoblibLauncher",
    "submitit_local": "LocalLauncher",
    "slurm": "SlurmLauncher",
}


@pytest.mark.parametrize("preset", sorted(LAUNCHERS))
def test_launcher_presets_choose_their_launcher_and_width(compose_cfg, preset):
    cfg = compose_cfg(f"parallel={preset}", hydra=True)
    launcher, workers = cfg.hydra.launcher, cfg.parallel.workers
    assert launcher._target_.endswith(LAUNCHERS[preset])
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
    assert set(space) == {"optimizer.lr", "optimizer.beta"}
    assert space["optimizer.lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert isinstance(space["optimizer.beta"], FloatDistribution)
    assert not space["optimizer.beta"].log
    assert 0 <= space["optimizer.beta"].low < space["optimizer.beta"].high < 1


def test_adam_searches_only_log_lr(compose_cfg):
    space = search_space(compose_cfg("optimizer=adam", hydra=True))
    assert space == {"optimizer.lr": FloatDistribution(1e-4, 1e-1, log=True)}


def test_shuffled_dataset_differs_only_by_name_and_shuffle(compose_cfg):
    plain = flatten(compose_cfg().dataset)
    shuffled = flatten(compose_cfg("dataset=mnist1d_shuffled").dataset)
    differing = {k for k in plain.keys() | shuffled.keys() if plain.get(k) != shuffled.get(k)}
    assert differing == {"name", "generation.shuffle_seq"}
    assert shuffled["generation.shuffle_seq"] is True


def test_common_overrides(compose_cfg):
    cfg = compose_cfg(
        "optimizer=gao",
        "optimizer.beta=0.9",
        "trainer.epochs=100",
        "seed.model=3",
        "dataset.generation.num_samples=1000",
        "dataset.generation.seed=7",
    )
    assert (cfg.optimizer.beta, cfg.trainer.epochs) == (0.9, 100)
    assert (cfg.seed.model, cfg.seed.data) == (3, 0)
    assert (cfg.dataset.generation.num_samples, cfg.dataset.generation.seed) == (1000, 7)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["trainer.epochs=0"], "trainer.epochs"),
        (["trainer.epochs=2.5"], "trainer.epochs"),
        (["trainer.batch_size=0"], "trainer.batch_size"),
        (["trainer.eval_batch_size=0"], "trainer.eval_batch_size"),
        (["trainer.eval_batch_size=2.5"], "trainer.eval_batch_size"),
        (["trainer.device=tpu"], "trainer.device"),
        (["trainer.threads=0"], "trainer.threads"),
        (["seed.model=1.5"], "seed.model"),
        (["objective=worst"], "objective"),
        (["parallel=joblib", "parallel.workers=0"], "parallel.workers"),
        (["tracking.optuna_trial=-1"], "tracking.optuna_trial"),
        (["tracking.flush_interval_s=-1"], "tracking.flush_interval_s"),
    ],
)
def test_bad_values_name_the_key_value_and_what_is_allowed(compose_cfg, overrides, key):
    cfg = compose_cfg(*overrides)
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}=\S+: must be "):
        validate(cfg)


@pytest.mark.parametrize(
    "override",
    ["optimizer.lr=inf", "optimizer.lr=-inf", "optimizer.lr=nan", "model.hidden=[8,inf]"],
)
def test_every_number_must_be_finite(compose_cfg, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}.*must be finite numbers"):
        validate(compose_cfg(override))


def test_paths_are_anchored_at_the_repo_root_whatever_the_cwd(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg(hydra=True)
    assert cfg.paths.root == str(REPO_ROOT)
    assert cfg.hydra.run.dir.startswith(f"{REPO_ROOT}/outputs/")
    assert cfg.hydra.sweep.dir.startswith(f"{REPO_ROOT}/outputs/")
    assert cfg.paths.data_cache == f"{REPO_ROOT}/.cache/data"
    assert cfg.dataset.cache_dir == cfg.paths.data_cache
    assert cfg.tracking.default_uri == f"sqlite:///{REPO_ROOT}/mlruns/mlflow.db"


def test_tracking_uri_prefers_config_then_environment_then_default(monkeypatch):
    tracking = OmegaConf.create(
        {"uri": None, "default_uri": "sqlite:////abs/default.db", "root": "/repo"}
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tracking) == "sqlite:////abs/default.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert tracking_uri(tracking) == "http://server:5000"
    tracking.uri = "sqlite:////abs/explicit.db"
    assert tracking_uri(tracking) == "sqlite:////abs/explicit.db"


@pytest.mark.parametrize("source", ["config", "environment"])
def test_a_relative_sqlite_path_is_taken_from_the_repo_root_whatever_the_cwd(
    compose_cfg, monkeypatch, tmp_path, source
):
    monkeypatch.chdir(tmp_path)
    relative = "sqlite:///outputs/x.db"
    if source == "config":
        cfg = compose_cfg(f"tracking.uri={relative}")
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", relative)
        cfg = compose_cfg()
    assert tracking_uri(cfg.tracking) == f"sqlite:///{REPO_ROOT}/outputs/x.db"


@pytest.mark.parametrize(
    "uri,expected",
    [
        ("sqlite:///a/b.db", "sqlite:////r/a/b.db"),
        ("sqlite:////abs/b.db", "sqlite:////abs/b.db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("http://h:5000", "http://h:5000"),
    ],
)
def test_anchored_uri(uri, expected):
    assert anchored_uri(uri, "/r") == expected


def test_params_are_the_flattened_config_without_paths_and_tracking(compose_cfg):
    params = flatten(compose_cfg("optimizer=gao"))
    assert params["model.hidden"] == [100, 100]
    assert params["optimizer.beta"] == 0.9 and params["seed.model"] == 0
    assert params["dataset.generation.num_samples"] == 5000
    assert params["model._target_"] == "gradalign.models.mlp.MLP"
    assert not [k for k in params if k.startswith(("paths.", "tracking.", "parallel."))]
    assert "dataset.cache_dir" not in params


def test_config_hash_ignores_seeds_and_where_things_go_but_not_what_is_computed(compose_cfg):
    base = config_hash(compose_cfg())
    same = [
        "seed.model=3",
        "seed.data=4",
        "tracking.experiment=x",
        "trainer.threads=1",
        "trainer.device=cpu",
        "paths.data_cache=/elsewhere",
        "dataset.cache_dir=/elsewhere",
        "parallel=joblib",
        "tracking.optuna_trial=5",
    ]
    for override in same:
        assert config_hash(compose_cfg(override)) == base, override
    for override in ["optimizer.lr=0.1", "model=cnn", "trainer.epochs=3", "optimizer=gao"]:
        assert config_hash(compose_cfg(override)) != base, override


def counted_validations(monkeypatch) -> list[int]:
    """Record each validation that checks a config's rules (not one that finds it validated)."""
    from gradalign import config

    (key, check, allowed), *rest = config._RULES
    assert key == "trainer.epochs"  # a key every composed config has: checked once per run
    checked: list[int] = []

    def counted(value):
        checked.append(value)
        return check(value)

    monkeypatch.setattr(config, "_RULES", ((key, counted, allowed), *rest))
    return checked


def test_a_plain_run_validates_its_config_once(monkeypatch, tmp_path, tiny):
    checked = counted_validations(monkeypatch)
    code = train_in_process(
        monkeypatch,
        *tiny,
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert code == 0
    assert checked == [2]  # train.py's check; run_experiment finds the config validated


def test_a_stacked_sweep_validates_each_config_once(monkeypatch, tmp_path, tiny):
    checked = counted_validations(monkeypatch)
    code = train_in_process(
        monkeypatch,
        "-m",
        "optimizer=adam",  # searches optimizer.lr only
        "parallel=stacked",
        "parallel.workers=2",
        *tiny,
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    )
    assert code == 0
    # The sweep's config, the two ends of the lr range (checked before the first trial), and
    # each trial's config: five configs, each checked once.
    assert checked == [2] * 5


def test_a_validated_config_that_changes_is_checked_again(compose_cfg):
    cfg = compose_cfg()
    validate(cfg)
    cfg.trainer.epochs = 0
    with pytest.raises(ConfigError, match=r"trainer.epochs=0: must be an integer >= 1"):
        validate(cfg)
