"""gradalign.stacked: K seeds trained as one stacked model equal the same K runs trained one by
one (curves, alignment, final weights), each with its own initial weights and data order; a model
that diverges stops alone; models and optimizers that cannot stack are refused with the reason.

Tolerance: float32, rtol 1e-5 and atol 1e-6 on every metric and weight. The stacked run does
the same arithmetic per model, but batched kernels (a bmm in place of K mm, sums over a
stacked tensor) reduce in another order, so results differ in the last bits (a few ulps, about
1e-7 here); a wrong data order, seed or cosine shows up at 1e-3 and more.
"""

import copy
import functools
import math
import re

import pytest
import torch
from helpers import scales
from omegaconf import OmegaConf
from torch import nn

from gradalign import GradientAlignmentOptimizer as GAO
from gradalign.components import build_dataset, build_optimizer
from gradalign.experiment import fit_as_configured, seeded_model, stack_and_optimizer
from gradalign.models.mlp import MLP
from gradalign.models.transformer import Transformer
from gradalign.records import init_hash
from gradalign.schema import Metric
from gradalign.stacked import NotStackable, Stack, model_refusal, optimizer_refusal
from gradalign.training import History, Models

TOL = {"rtol": 1e-5, "atol": 1e-6}
SEEDS = (1, 2, 3)
FIELDS = (Metric.TRAIN_LOSS, Metric.VAL_LOSS, Metric.VAL_ACC, Metric.TEST_LOSS, Metric.TEST_ACC)
OPTIMIZERS = {
    "adam": ["optimizer=adam"],
    "adam-eval-batches": ["optimizer=adam", "trainer.eval_batch_size=70"],
    **{
        f"gao-{target}-{granularity}": [
            "optimizer=gao",
            f"optimizer.target={target}",
            f"optimizer.granularity={granularity}",
            "optimizer.min_scale=0.1",
        ]
        for target in ("grad", "update")
        for granularity in ("tensor", "global", "row")
    },
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    cache = tmp_path_factory.mktemp("data")
    base = [
        "trainer.epochs=3",
        "trainer.device=cpu",
        "dataset.generation.num_samples=1000",
        f"paths.data_cache={cache}",
    ]

    def make(*overrides, seeds=SEEDS, data_seeds=None):
        from helpers import compose_config

        data_seeds = data_seeds or seeds
        return [
            compose_config(*base, *overrides, f"seed.model={s}", f"seed.data={d}")
            for s, d in zip(seeds, data_seeds, strict=True)
        ]

    return make


@pytest.fixture(scope="module")
def splits(configs):
    return build_dataset(configs("optimizer=adam")[0])


def seeded_stack(cfgs, splits):
    """The seeded models of ``cfgs`` stacked, and their optimizer, as experiment.train has them."""
    return stack_and_optimizer(cfgs, [seeded_model(cfg, splits) for cfg in cfgs], splits, "cpu")


def fit_as(cfgs, models, optimizer, splits, on_epoch=None, should_stop=None):
    """``models`` (runs of ``cfgs``) trained by the engine as experiment.train trains them."""
    return fit_as_configured(
        cfgs, models, optimizer, splits, "cpu", on_epoch=on_epoch, should_stop=should_stop
    )


def trained_alone(cfg, splits, on_epoch=None, should_stop=None):
    """The run of ``cfg`` trained alone: (model, history); ``on_epoch(model, metrics)``."""
    model = seeded_model(cfg, splits)
    optimizer = build_optimizer(cfg, model.parameters())
    hook = None if on_epoch is None else lambda _, metrics: on_epoch(model, metrics)
    (history,) = fit_as([cfg], Models(model), optimizer, splits, hook, [should_stop])
    return model, history


def one_by_one(cfgs, splits, on_epoch=None):
    """The unstacked runs: (model, history) per config; ``on_epoch(k, model, metrics)``."""
    return [
        trained_alone(cfg, splits, None if on_epoch is None else functools.partial(on_epoch, k))
        for k, cfg in enumerate(cfgs)
    ]


def assert_same_history(stacked, alone):
    assert (stacked.diverged, stacked.reason, stacked.stopped) == (
        alone.diverged,
        alone.reason,
        alone.stopped,
    )
    assert [e.epoch for e in stacked.epochs] == [e.epoch for e in alone.epochs]
    for mine, theirs in zip(stacked.epochs, alone.epochs, strict=True):
        for field in FIELDS:
            assert close(mine[field], theirs[field]), field
        assert scales(mine).keys() == scales(theirs).keys()
        for name, scale in scales(theirs).items():
            assert close(scales(mine)[name], scale), name


def close(a, b):
    return math.isclose(a, b, rel_tol=TOL["rtol"], abs_tol=TOL["atol"])


def assert_same_weights(stacked_model, model):
    for (name, p), (other, q) in zip(
        stacked_model.named_parameters(), model.named_parameters(), strict=True
    ):
        assert name == other
        torch.testing.assert_close(p, q, **TOL)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_stacked_runs_equal_the_runs_one_by_one(configs, splits, optimizer):
    cfgs = configs(*OPTIMIZERS[optimizer])
    stack, opt = seeded_stack(cfgs, splits)
    histories = fit_as(cfgs, stack, opt, splits)
    alone = one_by_one(cfgs, splits)
    for history, model, (single_model, single) in zip(histories, stack.models, alone, strict=True):
        assert len(history.epochs) == 3 and not history.diverged
        assert_same_history(history, single)
        assert_same_weights(model, single_model)
    if optimizer.startswith("gao"):
        assert scales(histories[0].epochs[-1])  # the per-model scales were recorded ...
        assert scales(histories[0].epochs[-1]) != scales(histories[1].epochs[-1])  # ... own
    first = [h.epochs[0][Metric.TRAIN_LOSS] for h in histories]
    assert len(set(first)) == len(SEEDS)  # the seeds' runs are not copies of one another


def test_each_model_starts_from_its_unstacked_runs_weights(configs, splits):
    cfgs = configs("optimizer=gao")
    stack, _ = seeded_stack(cfgs, splits)
    hashes = [init_hash(seeded_model(cfg, splits)) for cfg in cfgs]
    assert [init_hash(model) for model in stack.models] == hashes
    assert len(set(hashes)) == len(cfgs)
    for k, cfg in enumerate(cfgs):
        for name, tensor in seeded_model(cfg, splits).named_parameters():
            assert torch.equal(stack.params[name][k], tensor)


def test_each_model_follows_its_own_data_order(configs, splits):
    """Equal initial weights, different seed.data: the runs differ, each as its own fit; equal
    seed.data as well: the runs are identical."""
    cfgs = configs("optimizer=adam", seeds=(1, 1, 1), data_seeds=(1, 2, 1))
    stack, opt = seeded_stack(cfgs, splits)
    histories = fit_as(cfgs, stack, opt, splits)
    a, b, c = (h.epochs[0][Metric.TRAIN_LOSS] for h in histories)
    assert abs(a - b) > 1e-4
    assert a == c
    for history, (_, single) in zip(histories, one_by_one(cfgs, splits), strict=True):
        assert_same_history(history, single)


@pytest.mark.parametrize("optimizer", ["adam", "gao-update-global"])
def test_a_diverging_model_stops_alone(configs, splits, optimizer):
    """Model 1's weights turn NaN after epoch 1: its history ends diverged at epoch 2 as its
    unstacked fit does, and the other models train on, equal to their unstacked runs."""
    cfgs = configs(*OPTIMIZERS[optimizer])

    def poison_stacked(k, metrics):
        if k == 1 and metrics.epoch == 1:
            with torch.no_grad():
                stack.params["layers.0.weight"][1].fill_(math.nan)

    def poison_alone(k, model, metrics):
        if k == 1 and metrics.epoch == 1:
            with torch.no_grad():
                model.get_parameter("layers.0.weight").fill_(math.nan)

    stack, opt = seeded_stack(cfgs, splits)
    histories = fit_as(cfgs, stack, opt, splits, poison_stacked)
    alone = one_by_one(cfgs, splits, poison_alone)
    assert histories[1].diverged and [e.epoch for e in histories[1].epochs] == [1]
    assert histories[1].reason == "non-finite train loss (nan) at epoch 2 step 1"
    assert [len(h.epochs) for h in histories] == [3, 1, 3]
    for history, (_, single) in zip(histories, alone, strict=True):
        assert_same_history(history, single)
    for k in (0, 2):
        assert_same_weights(stack.models[k], alone[k][0])


def test_a_model_vmap_cannot_batch_is_refused(configs, splits):
    cfgs = configs("optimizer=adam", "model=gru")
    message = "model 'gru' cannot train stacked: torch.func.vmap cannot run it: Batching rule"
    with pytest.raises(NotStackable, match=re.escape(message)):
        seeded_stack(cfgs, splits)


def test_a_scheduled_config_is_refused_stacked_in_one_line(configs, splits):
    cfgs = configs("optimizer=adam", "scheduler=cosine")
    message = (
        "scheduler 'cosine' cannot train stacked: it steps one optimizer's lr, where stacked "
        "models hold one lr each (gradalign.per_model)"
    )
    with pytest.raises(NotStackable, match=f"^{re.escape(message)}$"):
        seeded_stack(cfgs, splits)


def transformers(dropout):
    torch.manual_seed(0)
    return [Transformer([8], 5, width=16, layers=1, heads=2, dropout=dropout) for _ in SEEDS]


def test_models_that_cannot_stack_say_why():
    tokens = torch.randint(0, 5, (2, 8))
    assert "called random operation" in model_refusal(transformers(0.1), tokens)
    # scaled_dot_product_attention has no batching rule on the CPU: vmap would loop
    assert model_refusal(transformers(0.0), tokens).startswith("vmap would loop over the models")
    normed = [nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)) for _ in SEEDS]
    assert model_refusal(normed, torch.randn(2, 4)) == (
        "it has buffers (1.running_mean, 1.running_var, 1.num_batches_tracked) that training "
        "may update per model"
    )
    mixed = [MLP([4], 3, [5], False), MLP([4], 3, [6], False)]
    assert model_refusal(mixed, torch.randn(2, 4)) == "the models differ in architecture"
    assert model_refusal([MLP([4], 3, [5], True) for _ in SEEDS], torch.randn(2, 4)) is None


def test_optimizers_that_cannot_stack_say_why():
    params = list(Stack([MLP([4], 3, [5], False) for _ in SEEDS]).params.values())
    assert optimizer_refusal(torch.optim.Adam(params)) is None
    assert optimizer_refusal(GAO(params, "AdamW", stack_dims=1)) is None
    assert optimizer_refusal(torch.optim.Adagrad(params)) == (
        "Adagrad is not known to be elementwise (stacking needs Adam, AdamW, SGD, RMSprop, "
        "StackedAdam, StackedAdamW)"
    )
    assert optimizer_refusal(GAO(params, "Adagrad", stack_dims=1)).startswith("Adagrad is not")
    assert optimizer_refusal(GAO(params, "Adam")) == (
        "GAO has stack_dims=0, not 1: its cosines would mix models"
    )


def test_configs_that_differ_beyond_their_seeds_are_not_stacked(configs, splits):
    cfgs = [*configs("optimizer=adam", seeds=(1,)), *configs("optimizer=gao", seeds=(2,))]
    with pytest.raises(ValueError, match="equal but for their seeds"):
        seeded_stack(cfgs, splits)


# --- models with hyperparameters of their own (a sweep's trials) -----------------------------

LRS, WEIGHT_DECAYS, BETAS = [1e-3, 3e-2, 1e-1], [0.0, 1e-2, 1e-1], [0.5, 0.9, 0.99]
EPSILONS = [1e-8, 1e-6, 1e-3]  # Adam's, one per model


def stacked_and_alone(torch_class, gao=None):
    """Two stacked parameters of 3 models, with StackedAdam(W) (inside GAO when ``gao`` gives
    its target and granularity) of per-model values, and each model's copies with its own
    torch optimizer."""
    from gradalign.stacked_adam import StackedAdam, StackedAdamW

    torch.manual_seed(0)
    params = [torch.randn(3, 5, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)]
    alone = [[p[k].detach().clone().requires_grad_() for p in params] for k in range(3)]
    stacked_class = StackedAdamW if torch_class is torch.optim.AdamW else StackedAdam
    stacked = stacked_class(params, lr=LRS, weight_decay=WEIGHT_DECAYS, eps=EPSILONS)
    singles = [
        torch_class(a, lr=LRS[k], weight_decay=WEIGHT_DECAYS[k], eps=EPSILONS[k])
        for k, a in enumerate(alone)
    ]
    if gao is not None:
        target, granularity = gao
        options = {"target": target, "granularity": granularity, "min_scale": 0.1}
        stacked = GAO(stacked, beta=BETAS, stack_dims=1, **options)
        singles = [GAO(o, beta=BETAS[k], **options) for k, o in enumerate(singles)]
    return params, stacked, alone, singles


@pytest.mark.parametrize("torch_class", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize(
    "gao", [None, *((t, g) for t in ("grad", "update") for g in ("tensor", "global", "row"))]
)
def test_per_model_hyperparameters_step_each_model_as_its_own_optimizer(torch_class, gao):
    params, stacked, alone, singles = stacked_and_alone(torch_class, gao)
    for _ in range(30):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        stacked.step()
        for k, single in enumerate(singles):
            for a, g in zip(alone[k], grads, strict=True):
                a.grad = g[k].clone()
            single.step()
    for k in range(3):
        for p, a in zip(params, alone[k], strict=True):
            torch.testing.assert_close(p[k], a, **TOL)
    assert not torch.allclose(params[0][0], params[0][1])  # the values did differ


def test_per_model_hyperparameters_are_checked():
    from gradalign.stacked_adam import StackedAdam

    p = torch.zeros(3, 2, requires_grad=True)
    with pytest.raises(ValueError, match=r"lr has 2 values for 3 stacked models"):
        StackedAdam([p], lr=[1e-3, 1e-2])
    with pytest.raises(ValueError, match=r"betas\[1\]=1.0 is outside the allowed range"):
        StackedAdam([p], betas=(0.9, [0.9, 0.99, 1.0]))
    with pytest.raises(ValueError, match=r"parameter 1 of shape \(2, 2\) is not stacked"):
        StackedAdam([p, torch.zeros(2, 2, requires_grad=True)])
    with pytest.raises(ValueError, match=r"beta=1.0 is outside the allowed range \[0, 1\)"):
        GAO([p], "Adam", beta=[0.9, 0.5, 1.0], stack_dims=1)
    with pytest.raises(ValueError, match=r"beta has 3 values: one per model needs stack_dims=1"):
        GAO([p], "Adam", beta=[0.9, 0.5, 0.1])
    with pytest.raises(ValueError, match=r"beta has 2 values: .* \(dim 0 of the parameters: 3"):
        GAO([p], "Adam", beta=[0.9, 0.5], stack_dims=1)


def test_a_stacked_adam_checkpoint_resumes_exactly():
    """The per-model values are in the state dict (as torch's lr is), GAO's beta is not."""
    from gradalign.stacked_adam import StackedAdam

    params, stacked, _, _ = stacked_and_alone(torch.optim.Adam, ("grad", "tensor"))
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        stacked.step()
    copies = [p.detach().clone().requires_grad_() for p in params]
    options = {"target": "grad", "granularity": "tensor", "min_scale": 0.1}
    resumed = GAO(StackedAdam(copies, lr=0.5), beta=BETAS, stack_dims=1, **options)
    resumed.load_state_dict(copy.deepcopy(stacked.state_dict()))  # not sharing tensors
    assert resumed.base.per_model["lr"].tolist() == LRS  # the saved values, not 0.5
    grads = [torch.randn_like(p) for p in params]
    for p, q, g in zip(params, copies, grads, strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    stacked.step()
    resumed.step()
    for p, q in zip(params, copies, strict=True):
        assert torch.equal(p, q)


TRIALS = {  # per-model values of three trials, as a sweep's sampler would set them
    "adam": ["optimizer=adam"],
    "adamw": ["optimizer=adamw"],
    **{
        f"gao-{t}-{g}": ["optimizer=gao", f"optimizer.target={t}", f"optimizer.granularity={g}"]
        for t in ("grad", "update")
        for g in ("tensor", "global", "row")
    },
}


def trial_configs(configs, name):
    cfgs = configs(*TRIALS[name])
    for k, cfg in enumerate(cfgs):
        cfg.optimizer.lr = LRS[k] / 10
        if "weight_decay" in cfg.optimizer:
            cfg.optimizer.weight_decay = WEIGHT_DECAYS[k]
        if "beta" in cfg.optimizer:
            cfg.optimizer.beta = BETAS[k]
    return cfgs


@pytest.mark.parametrize("name", list(TRIALS))
def test_trials_with_their_own_values_train_stacked_as_they_would_alone(configs, splits, name):
    cfgs = trial_configs(configs, name)
    stack, opt = seeded_stack(cfgs, splits)
    histories = fit_as(cfgs, stack, opt, splits)
    for history, model, (single_model, single) in zip(
        histories, stack.models, one_by_one(cfgs, splits), strict=True
    ):
        assert_same_history(history, single)
        assert_same_weights(model, single_model)


def test_a_model_whose_should_stop_says_so_ends_alone(configs, splits):
    cfgs = trial_configs(configs, "gao-grad-tensor")
    asked = []

    def stop_model_1_at_epoch_2(history):
        asked.append(history.epochs[-1].epoch)
        return history.epochs[-1].epoch == 2

    should_stop = [None, stop_model_1_at_epoch_2, None]
    stack, opt = seeded_stack(cfgs, splits)
    histories = fit_as(cfgs, stack, opt, splits, None, should_stop)
    assert asked == [1, 2]
    assert [len(h.epochs) for h in histories] == [3, 2, 3]
    assert [h.stopped for h in histories] == [False, True, False]
    alone = [history for _, history in one_by_one(cfgs, splits)]
    for k in (0, 2):
        assert_same_history(histories[k], alone[k])
    assert_same_history(histories[1], History(alone[1].epochs[:2], False, None, stopped=True))
    assert stack.active == [0, 2]  # model 1 left the stack: its slices are no longer computed
    assert all(t.shape[0] == 2 for t in stack.params.values())
    assert all(
        v.shape[0] == 2 for entry in opt.state.values() for v in entry.values() if v.dim() > 0
    )
    stop_at_2 = lambda history: history.epochs[-1].epoch == 2  # noqa: E731
    model, _ = trained_alone(cfgs[1], splits, should_stop=stop_at_2)
    assert_same_weights(stack.models[1], model)  # its weights as it left


def test_what_keeps_configs_apart_is_named(configs):
    from gradalign.per_model import per_model_spec, stack_key

    gao = trial_configs(configs, "gao-grad-tensor")
    assert len({stack_key(cfg) for cfg in gao}) == 1  # lr, beta and seeds differ: one stack
    wider = configs("optimizer=gao", "model.hidden=[64,64]")[0]
    assert stack_key(wider) != stack_key(gao[0])
    sgd = configs("optimizer=sgd")
    sgd[1].optimizer.lr = 0.5
    assert stack_key(sgd[0]) != stack_key(sgd[1])  # SGD's values are shared, never per model
    with pytest.raises(ValueError, match=r"optimizer.lr differs .* only none of its values may"):
        per_model_spec([cfg.optimizer for cfg in sgd])
    gao_eps = trial_configs(configs, "gao-grad-tensor")
    OmegaConf.update(gao_eps[1], "optimizer.cos_eps", 1e-20, force_add=True)  # GAO's own eps,
    assert stack_key(gao_eps[0]) != stack_key(gao_eps[1])  # the cosine's floor: one for all
    adam_eps = trial_configs(configs, "gao-grad-tensor")
    for cfg, eps in zip(adam_eps, EPSILONS, strict=True):
        OmegaConf.update(cfg, "optimizer.eps", eps, force_add=True)  # Adam's: one per model
    assert len({stack_key(cfg) for cfg in adam_eps}) == 1
    assert per_model_spec([cfg.optimizer for cfg in adam_eps])["eps"] == EPSILONS
    spec = per_model_spec([cfg.optimizer for cfg in gao])
    assert spec["base"] == "gradalign.stacked_adam.StackedAdam"
    assert spec["lr"] == [lr / 10 for lr in LRS] and spec["beta"] == BETAS
