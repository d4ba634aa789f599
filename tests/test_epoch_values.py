"""What the epoch engine must never change: the per-epoch metrics of plain and stacked fits, bit
for bit. Recorded (tests/fixtures/epoch_values.json) from the two loops of main at a4b2925
(``training.fit`` and ``stacked.fit_stacked``) before one engine (``training.fit_models``)
replaced them; every case here
must give exactly the recorded values (epoch time aside), divergence reasons and stops.

    python tests/test_epoch_values.py    # record the fixture again (only on purpose)
"""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import scales
from test_training import make_splits, sequence_splits, transformer

from gradalign import GradientAlignmentOptimizer as GAO
from gradalign.models.mlp import MLP
from gradalign.schema import Metric
from gradalign.stacked import Stack
from gradalign.training import fit, fit_models

FIXTURE = Path(__file__).parent / "fixtures" / "epoch_values.json"
BATCH = 50


def mlp(seed):
    torch.manual_seed(seed)
    return MLP(input_shape=[12], n_classes=4, hidden=[16], residual=False)


def gao(params, lr=1e-2, **options):
    return GAO(params, "Adam", lr=lr, min_scale=0.1, **options)


def stop_at(epoch):
    return lambda history: len(history.epochs) >= epoch


def record(history):
    """A history as plain values: each epoch's metrics but its wall time, how it ended."""
    epochs = []
    for e in history.epochs:
        epochs.append(
            {
                "epoch": e.epoch,
                "train_loss": e[Metric.TRAIN_LOSS],
                "val_loss": e[Metric.VAL_LOSS],
                "val_acc": e[Metric.VAL_ACC],
                "test_loss": e[Metric.TEST_LOSS],
                "test_acc": e[Metric.TEST_ACC],
                "alignment": scales(e),
            }
        )
    return {
        "epochs": epochs,
        "diverged": history.diverged,
        "reason": history.reason,
        "stopped": history.stopped,
    }


def plain(net, optimizer, data, epochs=3, **options):
    return [record(fit(net, optimizer, data, epochs=epochs, device="cpu", **options))]


def stacked(models, make_optimizer, data, epochs=3, **options):
    stack = Stack(models)
    optimizer = make_optimizer(list(stack.params.values()))
    histories = fit_models(stack, optimizer, data, epochs=epochs, device="cpu", **options)
    return [record(h) for h in histories]


def plain_gao():
    net = mlp(0)
    return plain(net, gao(net.parameters()), make_splits(), batch_size=BATCH, data_seed=0)


def plain_adam_scheduled_eval_batches():
    net = mlp(1)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return plain(
        net,
        optimizer,
        make_splits(),
        batch_size=BATCH,
        data_seed=4,
        eval_batch_size=25,
        scheduler=scheduler,
    )


def plain_sequence_gao_row():
    net = transformer(0)
    optimizer = gao(net.parameters(), granularity="row")
    return plain(
        net, optimizer, sequence_splits(), epochs=2, batch_size=30, data_seed=2, eval_batch_size=15
    )


def plain_diverged():
    net = mlp(2)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e6)
    return plain(net, optimizer, make_splits(), epochs=4, batch_size=BATCH, data_seed=0)


def plain_stopped():
    net = mlp(3)
    optimizer = gao(net.parameters())
    return plain(
        net, optimizer, make_splits(), batch_size=BATCH, data_seed=1, should_stop=stop_at(2)
    )


def stacked_gao_one_stopped():
    """Three GAO models, per-model beta, the second stopped after epoch 1 (the stack is cut)."""
    return stacked(
        [mlp(seed) for seed in (1, 2, 3)],
        lambda params: gao(params, stack_dims=1, beta=[0.9, 0.8, 0.95]),
        make_splits(),
        batch_size=BATCH,
        data_seeds=[1, 2, 3],
        should_stop=[None, stop_at(1), None],
    )


def stacked_adam_eval_batches():
    return stacked(
        [mlp(seed) for seed in (4, 5)],
        lambda params: torch.optim.Adam(params, lr=1e-2),
        make_splits(),
        batch_size=BATCH,
        data_seeds=[0, 7],
        eval_batch_size=25,
    )


def stacked_sequence_gao():
    return stacked(
        [transformer(seed) for seed in (0, 1)],
        lambda params: gao(params, stack_dims=1),
        sequence_splits(),
        epochs=2,
        batch_size=30,
        data_seeds=[2, 3],
    )


CASES = {
    f.__name__: f
    for f in (
        plain_gao,
        plain_adam_scheduled_eval_batches,
        plain_sequence_gao_row,
        plain_diverged,
        plain_stopped,
        stacked_gao_one_stopped,
        stacked_adam_eval_batches,
        stacked_sequence_gao,
    )
}


def one_thread(case):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return case()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(CASES))
def test_the_engine_gives_the_recorded_metrics_bit_for_bit(name):
    expected = json.loads(FIXTURE.read_text())[name]
    found = json.loads(json.dumps(one_thread(CASES[name])))  # NaN and float as the file has them
    assert found == expected or _nan_equal(found, expected)


def test_the_fixture_holds_what_the_cases_must_cover():
    recorded = json.loads(FIXTURE.read_text())
    assert recorded["plain_diverged"][0]["diverged"]
    assert recorded["plain_stopped"][0]["stopped"]
    assert [h["stopped"] for h in recorded["stacked_gao_one_stopped"]] == [False, True, False]
    assert recorded["stacked_gao_one_stopped"][0]["epochs"][-1]["alignment"]
    assert recorded["plain_sequence_gao_row"][0]["epochs"][-1]["alignment"]


def _nan_equal(a, b):
    """Equal, NaN equal to NaN (a scale's mean is NaN when a step had no gradient)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_nan_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_nan_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


if __name__ == "__main__":
    FIXTURE.write_text(
        json.dumps({name: one_thread(case) for name, case in CASES.items()}, indent=1) + "\n"
    )
