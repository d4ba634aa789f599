"""gradalign.training: the history, determinism, data order, divergence, alignment, schedulers."""

import math
import re

import numpy as np
import pytest
import torch
from helpers import REPO_ROOT, epoch_metrics, scales
from torch import nn
from torch.nn import functional as F

from gradalign.data import Splits
from gradalign.data.mnist1d import load_mnist1d
from gradalign.models.mlp import MLP
from gradalign.models.transformer import Transformer
from gradalign.schema import Metric
from gradalign.training import EpochMetrics, History, fit

DOCS_TRACKING = REPO_ROOT / "docs" / "tracking.md"
N_TRAIN, BATCH = 230, 50  # 5 steps per epoch, the last one partial (30 samples)


def make_splits(seed=0, n_train=N_TRAIN, n_eval=60, dim=12, n_classes=4):
    """Gaussian inputs labelled by a random linear teacher: small and learnable."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(dim, n_classes, generator=g)

    def part(n):
        x = torch.randn(n, dim, generator=g)
        return x, (x @ teacher).argmax(dim=1)

    return Splits(*part(n_train), *part(n_eval), *part(n_eval), n_classes=n_classes)


@pytest.fixture(scope="module")
def splits():
    return make_splits()


def model(seed=0, hidden=(16,)):
    torch.manual_seed(seed)
    return MLP(input_shape=[12], n_classes=4, hidden=list(hidden), residual=False)


def run(net, optimizer, data, epochs=3, data_seed=0, **kwargs):
    return fit(
        net,
        optimizer,
        data,
        epochs=epochs,
        batch_size=BATCH,
        data_seed=data_seed,
        device="cpu",
        **kwargs,
    )


def losses(history):
    """Every epoch's values but its wall time."""
    return [[v for k, v in e.values.items() if k != Metric.EPOCH_TIME] for e in history.epochs]


def test_history_has_one_complete_entry_per_epoch(splits):
    net = model()
    seen = []
    history = run(
        net, torch.optim.Adam(net.parameters(), lr=1e-2), splits, epochs=4, on_epoch=seen.append
    )
    assert not history.diverged and history.reason is None
    assert [e.epoch for e in history.epochs] == [1, 2, 3, 4]
    assert seen == history.epochs
    for e in history.epochs:
        assert isinstance(e, EpochMetrics)
        assert set(e.values) == set(Metric.PER_EPOCH)  # no scales: Adam has none
        assert all(isinstance(v, float) and math.isfinite(v) for v in e.values.values())
        assert 0.0 <= e[Metric.VAL_ACC] <= 1.0 and 0.0 <= e[Metric.TEST_ACC] <= 1.0
        assert e[Metric.EPOCH_TIME] > 0 and scales(e) == {}
    val = [e[Metric.VAL_LOSS] for e in history.epochs]
    assert history.objective("last") == val[-1]
    assert history.objective("best") == history.best_val_loss == min(val)
    assert history.best_epoch == 1 + val.index(min(val))


def test_metrics_are_sample_means(splits):
    """With lr 0 the weights stay put: train loss is the mean over all samples (the last partial
    batch weighted by its size) and val/test metrics are the full-split ones."""
    net = model()
    history = run(net, torch.optim.SGD(net.parameters(), lr=0.0), splits, epochs=1)
    (e,) = history.epochs
    with torch.no_grad():
        for x, y, loss, acc in [
            (splits.x_train, splits.y_train, e[Metric.TRAIN_LOSS], None),
            (splits.x_val, splits.y_val, e[Metric.VAL_LOSS], e[Metric.VAL_ACC]),
            (splits.x_test, splits.y_test, e[Metric.TEST_LOSS], e[Metric.TEST_ACC]),
        ]:
            logits = net(x)
            assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
            if acc is not None:
                assert acc == pytest.approx((logits.argmax(1) == y).float().mean().item())


class Recorder(nn.Module):
    """Wraps a model and records the inputs it sees in train mode, and whether grads were on."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.train_batches, self.eval_grad_enabled = [], []

    def forward(self, x):
        if self.training:
            self.train_batches.append(x.clone())
        else:
            self.eval_grad_enabled.append(torch.is_grad_enabled())
        return self.inner(x)


def test_each_epoch_visits_every_sample_once_in_batches(splits):
    net = Recorder(model())
    run(net, torch.optim.SGD(net.parameters(), lr=0.1), splits, epochs=2)
    assert [len(b) for b in net.train_batches] == [50, 50, 50, 50, 30] * 2
    expected = sorted(map(tuple, splits.x_train.tolist()))
    first, second = torch.cat(net.train_batches[:5]), torch.cat(net.train_batches[5:])
    assert sorted(map(tuple, first.tolist())) == expected
    assert sorted(map(tuple, second.tolist())) == expected
    assert not torch.equal(first, second)  # a fresh permutation each epoch
    assert net.eval_grad_enabled == [False] * 4  # val + test per epoch, without gradients
    assert net.training  # left in train mode


def test_same_seeds_give_identical_histories(splits):
    histories = []
    for _ in range(2):
        net = model(seed=3)
        histories.append(run(net, torch.optim.Adam(net.parameters(), lr=1e-2), splits, data_seed=5))
    assert losses(histories[0]) == losses(histories[1])  # bitwise


def test_data_order_ignores_the_global_rng(splits):
    histories = []
    for global_seed in (1, 2):
        net = model(seed=3)
        torch.manual_seed(global_seed)
        histories.append(run(net, torch.optim.Adam(net.parameters(), lr=1e-2), splits))
    assert losses(histories[0]) == losses(histories[1])


def test_data_seed_changes_the_order_not_the_initial_weights(splits):
    nets = [model(seed=3), model(seed=3)]
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(a, b)
    h0, h1 = (
        run(net, torch.optim.Adam(net.parameters(), lr=1e-2), splits, data_seed=seed)
        for net, seed in zip(nets, (0, 1), strict=True)
    )
    assert h0.epochs[0][Metric.TRAIN_LOSS] != h1.epochs[0][Metric.TRAIN_LOSS]


def test_adam_lowers_val_loss_on_mnist1d(tmp_path):
    data = load_mnist1d({"num_samples": 2000}, val_fraction=0.2, split_seed=0, cache_dir=tmp_path)
    torch.manual_seed(0)
    net = MLP(
        input_shape=data.input_shape, n_classes=data.n_classes, hidden=[100, 100], residual=True
    )
    with torch.no_grad():
        initial = F.cross_entropy(net(data.x_val), data.y_val).item()
    history = fit(
        net,
        torch.optim.Adam(net.parameters(), lr=1e-2),
        data,
        epochs=5,
        batch_size=100,
        data_seed=0,
        device="cpu",
    )
    assert history.best_val_loss < initial - 0.5
    assert max(e[Metric.VAL_ACC] for e in history.epochs) > 0.35  # chance is 0.1


class FailsAt(nn.Module):
    """A model whose output becomes +inf from a given train step (or NaN in eval mode)."""

    def __init__(self, inner, step=None, eval_nan=False):
        super().__init__()
        self.inner, self.step, self.eval_nan, self.calls = inner, step, eval_nan, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.step is not None and self.calls >= self.step:
                return out * math.inf
        elif self.eval_nan:
            return out * math.nan
        return out


def test_non_finite_train_loss_stops_without_raising(splits):
    net = FailsAt(model(), step=8)  # epoch 2, step 3 of 5
    seen = []
    history = run(
        net, torch.optim.Adam(net.parameters(), lr=1e-2), splits, epochs=5, on_epoch=seen.append
    )
    assert history.diverged
    assert re.fullmatch(r"non-finite train loss \((nan|inf)\) at epoch 2 step 3", history.reason)
    assert [e.epoch for e in history.epochs] == [1] and seen == history.epochs
    assert net.calls == 10  # stopped after epoch 2
    assert history.objective("last") == history.objective("best") == math.inf


def test_huge_learning_rate_diverges(splits):
    net = model(hidden=(64, 64))
    history = run(net, torch.optim.SGD(net.parameters(), lr=1e12), splits, epochs=20)
    assert history.diverged and history.reason.startswith("non-finite train loss (")
    assert len(history.epochs) < 20


def test_non_finite_val_loss_stops(splits):
    net = FailsAt(model(), eval_nan=True)
    history = run(net, torch.optim.Adam(net.parameters(), lr=1e-2), splits)
    assert history.diverged and history.reason == "non-finite val loss at epoch 1"
    assert history.epochs == []
    assert history.best_epoch == 0 and history.best_val_loss == math.inf


class Scaling:
    """Stand-in for GradientAlignmentOptimizer: a base optimizer plus ``last_scales``, None before
    the first step, then one entry per parameter, updated in place by ``scale_of(step)``."""

    def __init__(self, base, scale_of):
        self.base, self.scale_of, self.steps, self.last_scales = base, scale_of, 0, None
        self.param_groups = base.param_groups

    def zero_grad(self):
        self.base.zero_grad()

    def step(self):
        self.base.step()
        self.steps += 1
        if self.last_scales is None:
            n = sum(len(group["params"]) for group in self.param_groups)
            self.last_scales = torch.empty(n, device=self.param_groups[0]["params"][0].device)
        self.last_scales.fill_(self.scale_of(self.steps))


def test_constant_alignment_is_reported_per_parameter_name(splits):
    net = model()
    history = run(
        net, Scaling(torch.optim.Adam(net.parameters(), lr=1e-2), lambda s: 0.5), splits, epochs=2
    )
    names = [name for name, _ in net.named_parameters()]
    for e in history.epochs:
        assert scales(e) == {name: 0.5 for name in names}


def test_alignment_is_the_mean_over_each_epochs_steps(splits):
    net = model()
    extra = nn.Parameter(torch.zeros(3))  # optimised but not part of the model
    base = torch.optim.SGD([{"params": net.parameters()}, {"params": [extra]}], lr=0.1)
    history = run(net, Scaling(base, float), splits, epochs=2)
    names = [name for name, _ in net.named_parameters()] + ["param4"]
    # steps 1..5 in epoch 1 (mean 3), 6..10 in epoch 2 (mean 8)
    assert [scales(e) for e in history.epochs] == [
        dict.fromkeys(names, 3.0),
        dict.fromkeys(names, 8.0),
    ]


def test_scheduler_steps_once_per_epoch_after_its_steps(splits):
    net = model()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    first = next(net.parameters())
    steps_seen = []

    class Counting:
        def step(self):
            steps_seen.append(int(optimizer.state[first]["step"]))

    run(net, optimizer, splits, epochs=3, scheduler=Counting())
    assert steps_seen == [5, 10, 15]


def test_lr_scheduler_sets_each_epochs_learning_rate(splits):
    net = model()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    lrs = []
    run(
        net,
        optimizer,
        splits,
        epochs=3,
        scheduler=scheduler,
        on_epoch=lambda e: lrs.append(optimizer.param_groups[0]["lr"]),
    )
    assert lrs == pytest.approx([0.05, 0.025, 0.0125])


def test_each_epoch_records_the_lr_it_trained_with_under_a_scheduler(splits):
    net = model()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    history = run(net, optimizer, splits, epochs=3, scheduler=scheduler)
    assert [e[Metric.LR] for e in history.epochs] == pytest.approx([0.1, 0.05, 0.025])
    unscheduled = run(model(), torch.optim.Adam(net.parameters(), lr=0.1), splits, epochs=2)
    assert [Metric.LR in e.values for e in unscheduled.epochs] == [False, False]  # none logged


def test_history_objective():
    epoch = epoch_metrics(1, 2.0)
    later = epoch_metrics(2, 3.0)
    history = History([epoch, later], diverged=False, reason=None)
    assert (history.objective("last"), history.objective("best")) == (3.0, 2.0)
    assert history.best_epoch == 1
    with pytest.raises(ValueError, match="'mean'"):
        history.objective("mean")
    assert History([epoch], diverged=True, reason="x").objective("best") == math.inf


@pytest.mark.parametrize(("epochs", "batch_size"), [(0, 10), (3, 0), (3, 2.5), (True, 10)])
def test_bad_arguments_are_rejected(splits, epochs, batch_size):
    net = model()
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        fit(
            net,
            torch.optim.SGD(net.parameters(), lr=0.1),
            splits,
            epochs=epochs,
            batch_size=batch_size,
            data_seed=0,
            device="cpu",
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_cuda_matches_its_own_rerun(splits):
    histories = []
    for _ in range(2):
        net = model(seed=3)
        optimizer = Scaling(torch.optim.Adam(net.parameters(), lr=1e-2), lambda s: 0.5)
        histories.append(
            fit(net, optimizer, splits, epochs=3, batch_size=BATCH, data_seed=5, device="cuda")
        )
        assert next(net.parameters()).is_cuda
    assert not histories[0].diverged and scales(histories[0].epochs[-1])["layers.0.weight"] == 0.5
    assert losses(histories[0]) == pytest.approx(losses(histories[1]), rel=1e-5)


def cross_entropy_by_hand(logits, y):
    """Mean of -log softmax(logits)[y] over every example (and position): an independent
    formula for F.cross_entropy's value."""
    logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    picked = logits.gather(1, y[:, None]).squeeze(1)
    return (torch.logsumexp(logits, dim=1) - picked).mean().item()


def accuracy_by_hand(logits, y):
    return (logits.argmax(dim=-1) == y).double().mean().item()


@pytest.mark.parametrize("eval_batch_size", [25, 7])
def test_eval_batch_size_gives_the_mean_of_the_batch_means(splits, eval_batch_size):
    """60 val samples in batches of 25 (25, 25, 10) or 7 (8 x 7 and 4): each metric is the plain
    mean of the per-batch means, the short last batch counting as much as a full one."""
    net = model()
    history = run(
        net, torch.optim.SGD(net.parameters(), lr=0.0), splits, 1, eval_batch_size=eval_batch_size
    )
    (e,) = history.epochs
    for x, y, loss, acc in [
        (splits.x_val, splits.y_val, e[Metric.VAL_LOSS], e[Metric.VAL_ACC]),
        (splits.x_test, splits.y_test, e[Metric.TEST_LOSS], e[Metric.TEST_ACC]),
    ]:
        batch_losses, batch_accs = [], []
        with torch.no_grad():
            for start in range(0, len(y), eval_batch_size):
                logits = net(x[start : start + eval_batch_size])
                batch_losses.append(
                    cross_entropy_by_hand(logits, y[start : start + eval_batch_size])
                )
                batch_accs.append(accuracy_by_hand(logits, y[start : start + eval_batch_size]))
            full_loss = cross_entropy_by_hand(net(x), y)
        assert loss == pytest.approx(sum(batch_losses) / len(batch_losses), rel=1e-6)
        assert acc == pytest.approx(sum(batch_accs) / len(batch_accs), rel=1e-6)
        assert abs(loss - full_loss) > 1e-4  # the rule differs from the sample mean here


def test_full_batch_evaluation_is_the_exact_sample_mean(splits):
    """eval_batch_size None (the default) and one batch of the whole split agree, and equal the
    independent sample mean."""
    results = []
    for eval_batch_size in (None, 60, 1000):
        net = model()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
        results.append(run(net, optimizer, splits, 1, eval_batch_size=eval_batch_size).epochs[0])
    with torch.no_grad():
        expected = cross_entropy_by_hand(net(splits.x_val), splits.y_val)
    assert [r[Metric.VAL_LOSS] for r in results] == pytest.approx([expected] * 3, rel=1e-6)


@pytest.mark.parametrize("eval_batch_size", [0, 2.5, True])
def test_bad_eval_batch_size_is_rejected(splits, eval_batch_size):
    net = model()
    with pytest.raises(ValueError, match=r"trainer.eval_batch_size=\S+ is invalid"):
        run(net, torch.optim.SGD(net.parameters(), lr=0.1), splits, eval_batch_size=eval_batch_size)


VOCAB, CONTEXT = 7, 12


def sequence_splits(seed=0, n_train=120, n_eval=40):
    """Token windows in which each token is the previous one plus 1 or 2 (mod VOCAB), the choice
    random: targets are the inputs shifted by one, learnable to about ln 2 nats per token."""
    g = torch.Generator().manual_seed(seed)

    def part(n):
        steps = torch.randint(1, 3, (n, CONTEXT + 1), generator=g)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        tokens = (start + steps.cumsum(dim=1)) % VOCAB
        return tokens[:, :-1], tokens[:, 1:]

    return Splits(*part(n_train), *part(n_eval), *part(n_eval), n_classes=VOCAB)


def transformer(seed=0):
    torch.manual_seed(seed)
    return Transformer([CONTEXT], VOCAB, width=32, layers=1, heads=2, dropout=0.0)


def test_sequence_targets_are_scored_per_position():
    """(N, T) targets: with lr 0 the train loss is the cross-entropy over all N * T positions and
    the val accuracy the per-position accuracy, whole-split (None) or in batches."""
    data = sequence_splits()
    for eval_batch_size in (None, 15):
        net = transformer()
        (e,) = run(
            net, torch.optim.SGD(net.parameters(), lr=0.0), data, 1, eval_batch_size=eval_batch_size
        ).epochs
        with torch.no_grad():
            assert e[Metric.TRAIN_LOSS] == pytest.approx(
                cross_entropy_by_hand(net(data.x_train), data.y_train), rel=1e-6
            )
            batches = [(data.x_val[i : i + 15], data.y_val[i : i + 15]) for i in range(0, 40, 15)]
            if eval_batch_size is None:
                batches = [(data.x_val, data.y_val)]
            expected_loss = np.mean([cross_entropy_by_hand(net(x), y) for x, y in batches])
            expected_acc = np.mean([accuracy_by_hand(net(x), y) for x, y in batches])
        assert e[Metric.VAL_LOSS] == pytest.approx(expected_loss, rel=1e-6)
        assert e[Metric.VAL_ACC] == pytest.approx(expected_acc, rel=1e-6)


def test_a_sequence_model_learns_the_next_token():
    data = sequence_splits()
    net = transformer()
    with torch.no_grad():
        initial = cross_entropy_by_hand(net(data.x_val), data.y_val)
    history = run(net, torch.optim.Adam(net.parameters(), lr=1e-2), data, epochs=15)
    assert initial == pytest.approx(math.log(VOCAB), abs=0.1)  # a uniform start
    assert history.best_val_loss < math.log(2) + 0.25  # near the data's ln 2 per token
    assert history.epochs[-1][Metric.VAL_ACC] > 0.4


def test_every_per_epoch_metric_has_its_line_in_docs_tracking_md():
    """A per-epoch metric is its key in schema.Metric.PER_EPOCH, its computation in the engine
    (the key set of every epoch is checked above and, as logged to MLflow, in test_train) and
    its row in docs/tracking.md's table of metrics."""
    rows = [line for line in DOCS_TRACKING.read_text().splitlines() if line.startswith("| `")]
    documented = {key for row in rows for key in re.findall(r"`([^`]+)`", row.split("|")[1])}
    assert set(Metric.PER_EPOCH) <= documented
    assert f"{Metric.ALIGNMENT_PREFIX}<parameter name>" in documented
