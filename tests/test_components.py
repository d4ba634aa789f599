"""gradalign.components: every data set, model and optimizer of conf/ builds from its
``_target_`` and works with every other (cases derived from conf/), and a constructor's refusal
reads as one ConfigError naming the group and the value."""

import math

import pytest
import torch
from helpers import options
from omegaconf import OmegaConf

from gradalign import GradientAlignmentOptimizer, hydra_compat
from gradalign.components import (
    build,
    build_dataset,
    build_model,
    build_optimizer,
    build_scheduler,
    check_fits,
    ignored_keywords,
)
from gradalign.config import ConfigError
from gradalign.data import Splits
from gradalign.hydra_compat import TRUSTED_TARGETS
from gradalign.models.linear import Linear
from gradalign.models.transformer import Transformer
from gradalign.schema import Metric
from gradalign.training import fit


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
    for _ in range(2):  # ADOPT's first step only takes the gradient's second moment
        optimizer.zero_grad()
        layer(torch.randn(4, 3)).square().sum().backward()
        optimizer.step()
    assert not torch.equal(layer.weight, before)


@pytest.fixture
def trusted_dict(monkeypatch):
    """builtins.dict as a trusted target (Hydra 1.4 resolves only those): a component that
    returns its arguments."""
    monkeypatch.setattr(hydra_compat, "TRUSTED_TARGETS", (*TRUSTED_TARGETS, "builtins.dict"))


def test_name_is_a_label_not_an_argument(trusted_dict):
    built = build("model", OmegaConf.create({"_target_": "builtins.dict", "name": "x", "a": 1}))
    assert built == {"a": 1}


def test_a_target_outside_the_trusted_packages_is_one_line_on_hydra_1_4():
    """Hydra 1.4 resolves a _target_ only in the packages trusted code names (its execution
    whitelist, which Hydra 1.5 enforces); Hydra 1.3 resolves any."""
    node = OmegaConf.create({"_target_": "builtins.dict", "name": "x", "a": 1})
    if not hydra_compat.HYDRA_14:
        assert build("model", node) == {"a": 1}
        return
    with pytest.raises(ConfigError) as info:
        build("model", node)
    assert str(info.value) == (
        "invalid model config 'x' (model.a=1): Target 'builtins.dict' is not in the Hydra "
        "execution whitelist."
    )


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


def test_a_target_that_does_not_return_splits_is_refused(compose_cfg, trusted_dict):
    cfg = compose_cfg("dataset._target_=builtins.dict", "~dataset.generation")
    with pytest.raises(ConfigError, match="returned dict, not gradalign.data.Splits"):
        build_dataset(cfg)


def test_errors_that_are_not_about_config_pass_through(compose_cfg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError):
        build_dataset(compose_cfg(f"paths.data_cache={blocker}/cache"))


# Optimizers of another library (pytorch_optimizer) held to torch.optim's standard.
LIBRARY = ["lion", "adopt", "lookahead"]  # conf/optimizer's options from pytorch_optimizer


@pytest.mark.parametrize(
    "overrides,ignored",
    [
        # Lion takes **kwargs and keeps them in its param groups without reading them
        (["optimizer=lion", "+optimizer.wieght_decay=0.1"], "wieght_decay"),
        # AdaBelief reads no cautious flag (Lion, ADOPT and LaProp do)
        (
            ["optimizer._target_=pytorch_optimizer.AdaBelief", "+optimizer.cautious=true"],
            "cautious",
        ),
        # through GAO and through a wrapper, checked against the base they pass them to
        (["optimizer=gao", "optimizer.base=pytorch_optimizer.Lion", "+optimizer.wd=0.1"], "wd"),
        (["optimizer=lookahead", "optimizer.base=pytorch_optimizer.Lion", "+optimizer.K=3"], "K"),
    ],
)
def test_a_keyword_a_kwargs_catch_all_would_ignore_is_refused(compose_cfg, overrides, ignored):
    with pytest.raises(ConfigError) as info:
        build_optimizer(compose_cfg(*overrides), torch.nn.Linear(2, 2).parameters())
    (line,) = str(info.value).splitlines()
    assert line.startswith("invalid optimizer config ")
    assert f" would ignore {ignored}: neither one of its parameters (" in line
    assert "weight_decay" in line and "nor an option its code reads" in line


def test_ignored_keywords_are_those_neither_named_nor_read_by_the_code():
    def factory(params, lr=0.1, **kwargs):  # a target of one's own with a catch-all
        return torch.optim.SGD(params, lr=lr, momentum=kwargs.get("momentum", 0.0))

    assert ignored_keywords(factory, ["lr", "momentum", "momentm", "nesterov"]) == [
        "momentm",
        "nesterov",
    ]
    assert ignored_keywords(torch.optim.SGD, ["momentm"]) == []  # Python refuses it itself


@pytest.mark.parametrize(
    "overrides,group_key",
    [
        (["optimizer=lion", "+optimizer.cautious=true"], "cautious"),
        (["optimizer=adopt", "optimizer.cautious=true"], "cautious"),
        (
            ["optimizer=gao", "optimizer.base=pytorch_optimizer.Lion", "+optimizer.use_gc=true"],
            "use_gc",
        ),
    ],
)
def test_an_option_a_kwargs_catch_all_reads_is_taken(compose_cfg, overrides, group_key):
    optimizer = build_optimizer(compose_cfg(*overrides), torch.nn.Linear(2, 2).parameters())
    assert optimizer.param_groups[0][group_key] is True


@pytest.mark.parametrize("wrapper", ["Lookahead", "OrthoGrad"])
def test_a_wrapper_builds_from_parameters_as_gao_does_and_steps_as_built_by_hand(
    compose_cfg, wrapper
):
    import pytorch_optimizer

    overrides = ["optimizer=lookahead", "optimizer.lr=0.05"]
    if wrapper == "OrthoGrad":  # no k, alpha: OrthoGrad names neither
        overrides += ["optimizer._target_=pytorch_optimizer.OrthoGrad", "~optimizer.k"]
        overrides += ["~optimizer.alpha"]
    cfg = compose_cfg(*overrides, "optimizer.base=SGD", "+optimizer.momentum=0.5")
    torch.manual_seed(0)
    layers = [torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)]
    layers[1].load_state_dict(layers[0].state_dict())
    built = build_optimizer(cfg, layers[0].parameters())
    base = torch.optim.SGD(layers[1].parameters(), lr=0.05, momentum=0.5)
    own = {"k": 5, "alpha": 0.5} if wrapper == "Lookahead" else {}
    by_hand = getattr(pytorch_optimizer, wrapper)(base, **own)
    assert type(built) is type(by_hand) and type(built.optimizer) is torch.optim.SGD
    assert built.param_groups[0]["lr"] == 0.05 and built.param_groups[0]["momentum"] == 0.5
    x = torch.randn(8, 3)
    for _ in range(7):  # past Lookahead's k=5: its slow weights are used once
        for layer, optimizer in zip(layers, (built, by_hand), strict=True):
            optimizer.zero_grad()
            layer(x).square().sum().backward()
            optimizer.step()
    assert torch.equal(layers[0].weight, layers[1].weight)
    assert not torch.equal(layers[0].weight, torch.nn.Linear(3, 2).weight)


def test_an_optimizer_training_with_another_lr_than_configured_is_refused(compose_cfg):
    """GrokFastAdamW divides its lr by 1 + grokfast_lamb: runs would record an lr it does not
    train with. With normalize_lr=false it trains with the lr it is given."""
    overrides = ["optimizer._target_=pytorch_optimizer.GrokFastAdamW", "optimizer.lr=0.03"]
    with pytest.raises(ConfigError) as info:
        build_optimizer(compose_cfg(*overrides), torch.nn.Linear(2, 2).parameters())
    assert str(info.value).endswith(
        "pytorch_optimizer.GrokFastAdamW trains with lr=0.01, not the configured lr=0.03 that "
        "runs record: set the option that rescales it"
    )
    cfg = compose_cfg(*overrides, "+optimizer.normalize_lr=false")
    assert build_optimizer(cfg, torch.nn.Linear(2, 2).parameters()).param_groups[0]["lr"] == 0.03


@pytest.mark.parametrize("name", LIBRARY)
def test_each_library_optimizer_trains_a_tracked_run(compose_cfg, tiny, mlflow_uri, name):
    from mlflow.tracking import MlflowClient

    from gradalign import experiment

    cfg = compose_cfg(f"optimizer={name}", *tiny)
    history, run_id = experiment.run_experiment(cfg)
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["optimizer"] == name
    assert run.data.params["optimizer._target_"] == cfg.optimizer._target_
    assert run.data.params["optimizer.lr"] == str(cfg.optimizer.lr)
    assert [e.epoch for e in history.epochs] == [1, 2] and not history.diverged


def scheduled_lr(node, lr, epoch):
    """The lr that epoch ``epoch`` (1-based) trains with under the scheduler config ``node``,
    from the formula in its YAML (independent of torch's implementation)."""
    if node.name == "cosine":
        return (
            node.eta_min
            + (lr - node.eta_min) * (1 + math.cos(math.pi * (epoch - 1) / node.T_max)) / 2
        )
    assert node.name == "warmup"
    progress = min(epoch - 1, node.total_iters) / node.total_iters
    return lr * (node.start_factor + (node.end_factor - node.start_factor) * progress)


@pytest.mark.parametrize("name", [n for n in options("scheduler") if n != "none"])
def test_every_scheduler_drives_the_base_optimizers_lr_under_gao(compose_cfg, name):
    """GAO's param_groups are its base's: a scheduler built over GAO sets the lr the base
    steps with, epoch by epoch, as the scheduler's config says (each epoch's Metric.LR)."""
    cfg = compose_cfg("optimizer=gao", f"scheduler={name}", "trainer.epochs=7")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    splits = Splits(x, y, x[:8], y[:8], x[:8], y[:8], n_classes=3)
    model = Linear(input_shape=[6], n_classes=3)
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = build_scheduler(cfg, optimizer)
    base_lrs = []

    history = fit(
        model,
        optimizer,
        splits,
        epochs=7,
        batch_size=10,
        data_seed=0,
        device="cpu",
        scheduler=scheduler,
        on_epoch=lambda e: base_lrs.append(optimizer.base.param_groups[0]["lr"]),
    )
    expected = [scheduled_lr(cfg.scheduler, cfg.optimizer.lr, e) for e in range(1, 9)]
    assert [e[Metric.LR] for e in history.epochs] == pytest.approx(expected[:7], rel=1e-12)
    # after each epoch's scheduler step, the base holds the next epoch's lr
    assert base_lrs == pytest.approx(expected[1:], rel=1e-12)
    assert len(set(expected)) > 2  # the schedule moves the lr


def test_no_scheduler_by_default(compose_cfg):
    cfg = compose_cfg()
    assert (
        build_scheduler(cfg, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)) is None
    )


def test_a_scheduler_that_needs_a_metric_is_refused_in_one_line(compose_cfg):
    cfg = compose_cfg(
        "scheduler=cosine",
        "scheduler._target_=torch.optim.lr_scheduler.ReduceLROnPlateau",
        "~scheduler.T_max",
        "~scheduler.eta_min",
    )
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ConfigError) as info:
        build_scheduler(cfg, optimizer)
    assert str(info.value) == (
        "invalid scheduler config 'cosine': _target_='torch.optim.lr_scheduler.ReduceLROnPlateau'"
        " is not a torch.optim.lr_scheduler.LRScheduler stepped without a metric"
    )


def test_a_scheduler_refusing_its_arguments_is_a_config_error(compose_cfg):
    cfg = compose_cfg("scheduler=warmup", "scheduler.start_factor=0")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ConfigError, match=r"invalid scheduler config 'warmup' \(.*start_factor=0"):
        build_scheduler(cfg, optimizer)
