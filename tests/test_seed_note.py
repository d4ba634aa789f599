"""The research note's set-up as the seed_note preset: it composes to the note's facts, and GAO
with the note's settings trains exactly as the note's own per-tensor loop."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradalign import GradientAlignmentOptimizer
from gradalign.components import build_dataset, build_model

BETA, LR = 0.99, 0.0085  # the note's published GAO values, as inputs of an equivalence check


class NoteGAO:
    """The note's GAO, written plainly as its optimizer.py does it (``.item()`` and all)."""

    def __init__(self, params, lr, beta):
        self.params = list(params)
        self.base = torch.optim.Adam(self.params, lr=lr)
        self.beta = beta
        self.ema = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self):
        self.base.zero_grad()

    @torch.no_grad()
    def step(self):
        for p, m in zip(self.params, self.ema, strict=True):
            if p.grad is None:
                continue
            m.mul_(self.beta).add_(p.grad, alpha=1 - self.beta)
            cos = F.cosine_similarity(p.grad.flatten(), m.flatten(), dim=0, eps=1e-8)
            p.grad.mul_(cos.clamp(0, 1).item())
        self.base.step()


def simple_mlp():
    return nn.Sequential(nn.Linear(40, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))  # fmt: skip


def test_gao_with_the_notes_settings_equals_the_notes_loop_over_100_steps():
    torch.manual_seed(0)
    ours, theirs = simple_mlp(), simple_mlp()
    theirs.load_state_dict(ours.state_dict())
    gao = GradientAlignmentOptimizer(ours.parameters(), "Adam", lr=LR, beta=BETA)
    note = NoteGAO(theirs.parameters(), lr=LR, beta=BETA)
    data = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(100):
        x, y = torch.randn(64, 40, generator=data), torch.randint(0, 10, (64,), generator=data)
        for model, optimizer in ((ours, gao), (theirs, note)):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            worst = max(worst, (a - b).abs().max().item())
    assert worst < 1e-6
    torch.manual_seed(0)
    start = simple_mlp()
    pairs = zip(ours.parameters(), start.parameters(), strict=True)
    moved = max((a - b).abs().max().item() for a, b in pairs)
    assert moved > 1e-2  # they trained: the agreement is not two models standing still


def test_the_preset_is_the_notes_set_up(compose_cfg, tmp_path):
    cfg = compose_cfg("experiment=seed_note", "optimizer=gao", f"paths.data_cache={tmp_path}",
                      hydra=True)  # fmt: skip
    trainer = cfg.trainer
    assert (trainer.epochs, trainer.batch_size, trainer.eval_batch_size) == (25, 64, 256)
    assert cfg.objective == "best"
    assert cfg.hydra.sweeper.n_trials == 30
    assert dict(cfg.hydra.sweeper.params) == {
        "optimizer.lr": "tag(log, interval(1e-5, 1e-1))",
        "optimizer.beta": "interval(0.8, 0.99)",
    }
    splits = build_dataset(cfg)
    assert splits.val_is_test and len(splits.y_train) == 4000 and len(splits.y_test) == 1000
    assert torch.equal(splits.x_val, splits.x_test)
    model = build_model(cfg, splits)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [tuple(p.shape) for p in simple_mlp().parameters()]
    x = torch.randn(5, 40)
    plain = simple_mlp()
    plain.load_state_dict(dict(zip(plain.state_dict(), model.state_dict().values(), strict=True)))
    torch.testing.assert_close(model(x), plain(x))  # no residual connection


@pytest.mark.parametrize("optimizer", ["adam", "gao"])
def test_the_notes_published_values_are_references_not_settings(compose_cfg, optimizer):
    cfg = compose_cfg("experiment=seed_note", f"optimizer={optimizer}")
    assert cfg.optimizer.lr == 1e-2  # the optimizer's own default, not the note's result
    assert set(cfg.reference[optimizer]) <= {"optimizer.lr", "optimizer.beta"}
