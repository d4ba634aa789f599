"""gradalign.components: every data set, model and optimizer of conf/ builds from its
``_target_`` and works with every other (cases derived from conf/), and a constructor's refusal
reads as one ConfigError naming the group and the value."""

import pytest
import torch
from helpers import options
from omegaconf import OmegaConf

from gradalign import GradientAlignmentOptimizer
from gradalign.components import build, build_dataset, build_model, build_optimizer
from gradalign.config import ConfigError
from gradalign.data import Splits


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def datasets(cache):
    """Every conf/dataset option, built."""
    from helpers import compose_config

    return {
        name: build_dataset(compose_config(f"dataset={name}", f"paths.data_cache={cache}"))
        for name in options("dataset")
    }


@pytest.mark.parametrize("name", options("dataset"))
def test_every_dataset_builds_splits(datasets, name):
    splits = datasets[name]
    assert isinstance(splits, Splits)
    for x, y in [
        (splits.x_train, splits.y_train),
        (splits.x_val, splits.y_val),
        (splits.x_test, splits.y_test),
    ]:
        assert len(x) == len(y) > 0 and tuple(x.shape[1:]) == splits.input_shape
        assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) < splits.n_classes


@pytest.mark.parametrize("dataset", options("dataset"))
@pytest.mark.parametrize("model", options("model"))
def test_every_model_builds_on_every_dataset(compose_cfg, datasets, dataset, model):
    splits = datasets[dataset]
    net = build_model(compose_cfg(f"model={model}"), splits)
    assert net(splits.x_val[:7]).shape == (7, splits.n_classes)


@pytest.mark.parametrize("name", options("optimizer"))
def test_every_optimizer_builds_with_every_setting_and_steps(compose_cfg, name):
    cfg = compose_cfg(f"optimizer={name}")
    layer = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(cfg, layer.parameters())
    group = optimizer.param_groups[0]
    settings = OmegaConf.to_container(cfg.optimizer)
    for key, value in settings.items():
        if key in group:
            assert group[key] == value, key
    if isinstance(optimizer, GradientAlignmentOptimizer):
        for key in ("beta", "target", "granularity", "min_scale"):
            assert getattr(optimizer, key) == settings[key], key
    before = layer.weight.detach().clone()
    layer(torch.randn(4, 3)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(layer.weight, before)


def test_name_is_a_label_not_an_argument():
    built = build("model", OmegaConf.create({"_target_": "builtins.dict", "name": "x", "a": 1}))
    assert built == {"a": 1}


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (
            ["optimizer.lr=-1"],
            "invalid optimizer config 'adam' (optimizer.lr=-1): Invalid learning",
        ),
        (["optimizer=gao", "optimizer.beta=1.0"], "optimizer.beta=1.0, "),
        (
            ["optimizer=gao", "optimizer.beta=1.0"],
            "): beta=1.0 is outside the allowed range [0, 1)",
        ),
        (["optimizer=gao", "optimizer.target=foo"], "target='foo' is not one of"),
        (["+optimizer.betas=[0.9]"], "invalid optimizer config 'adam'"),
        (["+optimizer.momentum_typo=1"], "momentum_typo"),
    ],
)
def test_optimizer_refusals_are_config_errors_naming_group_and_value(
    compose_cfg, overrides, needle
):
    with pytest.raises(ConfigError) as info:
        build_optimizer(compose_cfg(*overrides), torch.nn.Linear(2, 2).parameters())
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["model.hidden=[8,0]"], "invalid model config 'mlp' (model.hidden=[8, 0], "),
        (["model.hidden=[8,0]"], "): model.hidden=[8, 0] is invalid: must be a list of integers"),
        (["model.residual=maybe"], "model.residual='maybe'"),
        (["model=cnn", "model.channels=0"], "): model.channels=0 is invalid"),
        (
            ["model._target_=gradalign.models.nothing.Nope"],
            "'gradalign.models.nothing.Nope' cannot be imported",
        ),
    ],
)
def test_model_refusals_are_config_errors(compose_cfg, datasets, overrides, needle):
    with pytest.raises(ConfigError) as info:
        build_model(compose_cfg(*overrides), datasets["mnist1d"])
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["dataset.val_fraction=1.0"], "dataset.val_fraction=1.0 is invalid"),
        (["+dataset.generation.num_sample=10"], "num_sample"),
    ],
)
def test_dataset_refusals_are_config_errors(compose_cfg, cache, overrides, needle):
    with pytest.raises(ConfigError) as info:
        build_dataset(compose_cfg(*overrides, f"paths.data_cache={cache}"))
    assert "invalid dataset config 'mnist1d'" in str(info.value) and needle in str(info.value)


def test_a_target_that_does_not_return_splits_is_refused(compose_cfg):
    cfg = compose_cfg("dataset._target_=builtins.dict", "~dataset.generation")
    with pytest.raises(ConfigError, match="returned dict, not gradalign.data.Splits"):
        build_dataset(cfg)


def test_errors_that_are_not_about_config_pass_through(compose_cfg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError):
        build_dataset(compose_cfg(f"paths.data_cache={blocker}/cache"))
