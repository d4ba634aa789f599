"""gradalign.components: every data set, model and optimizer of conf/ builds from its
``_target_`` and works with every other (cases derived from conf/), and a constructor's refusal
reads as one ConfigError naming the group and the value."""

import pytest
import torch
from helpers import options
from omegaconf import OmegaConf

from gradalign import GradientAlignmentOptimizer
from gradalign.components import build, build_dataset, build_model, build_optimizer, check_fits
from gradalign.config import ConfigError
from gradalign.data import Splits
from gradalign.models.linear import Linear
from gradalign.models.transformer import Transformer


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


@pytest.fixture(scope="module")
def fits(datasets):
    """{(model, dataset): the built model, or the ConfigError refusing the pair} for every pair
    of conf/ options."""
    from helpers import compose_config

    built = {}
    for dataset, splits in datasets.items():
        for model in options("model"):
            cfg = compose_config(f"model={model}", f"dataset={dataset}")
            try:
                built[model, dataset] = build_model(cfg, splits)
            except ConfigError as error:
                built[model, dataset] = error
    return built


@pytest.mark.parametrize("dataset", options("dataset"))
@pytest.mark.parametrize("model", options("model"))
def test_every_model_predicts_every_dataset_s_targets_or_is_refused_naming_both(
    datasets, fits, dataset, model
):
    splits, built = datasets[dataset], fits[model, dataset]
    if isinstance(built, ConfigError):  # by the constructor (of the shapes) or by check_fits
        assert str(built).startswith(
            (f"invalid model config {model!r}", f"model {model!r} does not fit dataset {dataset!r}")
        )
        assert f"dataset {dataset!r}" in str(built)
    else:  # built on the first two examples: it predicts any number of them, targets' shape
        built.eval()
        with torch.no_grad():
            logits = built(splits.x_val[:7])
        assert logits.shape == (*splits.y_val[:7].shape, splits.n_classes)


def test_every_model_fits_a_dataset_and_every_dataset_a_model(fits):
    fitting = [pair for pair, built in fits.items() if not isinstance(built, ConfigError)]
    assert {model for model, _ in fitting} == set(options("model"))
    assert {dataset for _, dataset in fitting} == set(options("dataset"))


@pytest.mark.parametrize(
    "model,dataset,needle",
    [
        ("mlp", "charlm", "inputs of shape (2, 64) and dtype int64 the model raised RuntimeError"),
        ("transformer", "mnist1d", "dtype float32 the model raised RuntimeError"),
        ("gru", "charlm", "dtype int64 the model raised ValueError"),
        ("cnn", "digits", "input_shape=[1, 8, 8] is invalid: must be (length,) or (C, length) "),
        ("cnn", "digits", "(dataset 'digits' has input_shape=[1, 8, 8], n_classes=10)"),
        ("cnn2d", "mnist1d", "input_shape=[40] is invalid: must be (H, W) or (C, H, W)"),
    ],
)
def test_pairs_that_cannot_work_are_refused_with_the_reason(fits, model, dataset, needle):
    assert isinstance(fits[model, dataset], ConfigError) and needle in str(fits[model, dataset])


def test_a_model_predicting_the_wrong_shape_is_refused_naming_both_shapes(datasets):
    """A classifier that reads token ids (a linear model made to cast them) returns one
    prediction per window where charlm's targets are one per position."""

    class FloatLinear(Linear):
        def forward(self, x):
            return super().forward(x.float())

    splits = datasets["charlm"]
    with pytest.raises(ConfigError) as info:
        check_fits(FloatLinear([64], splits.n_classes), splits, "refused")
    expected = f"returned (2, {splits.n_classes}), but targets of shape (2, 64) need logits of "
    assert str(info.value).startswith("refused: on inputs") and expected in str(info.value)


def test_the_fit_check_draws_no_random_number_and_keeps_the_mode(compose_cfg, datasets):
    cfg = compose_cfg("model=transformer", "dataset=charlm", "model.dropout=0.5")
    torch.manual_seed(0)
    model = build_model(cfg, datasets["charlm"])
    after_build = torch.rand(3)
    torch.manual_seed(0)
    Transformer([64], datasets["charlm"].n_classes, width=64, layers=2, heads=4, dropout=0.5)
    assert torch.equal(torch.rand(3), after_build)  # building drew only the initial weights
    assert model.training


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
