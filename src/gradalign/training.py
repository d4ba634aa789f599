"""The training loop: fit a classifier on in-memory splits and return its per-epoch history.

Targets are class labels of shape (N,) with logits (N, classes), or per-position targets of shape
(N, T) with logits (N, T, classes) (a language model's next characters): the loss is then the
cross-entropy over all N * T positions and the accuracy the per-position accuracy.

This is the hot path of every sweep trial, so the loop does only what a bare loop does plus one
``detach`` per step (and one ``add_`` per step for optimizers exposing ``last_scales``): losses
stay on the device and each epoch ends with a single host synchronisation that fetches all of its
metrics at once. It knows nothing of Hydra, Optuna or MLflow; callers observe epochs through
``on_epoch`` and may end a fit early through ``should_stop`` (a sweep's trial pruner).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from gradalign.checks import positive_int
from gradalign.data import Splits

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class EpochMetrics:
    """Metrics of one completed epoch (``epoch`` is 1-based; times in seconds).

    ``alignment`` maps parameter names to the mean GAO scale over the epoch's steps ({} for
    optimizers without ``last_scales``); a NaN scale (no gradient in a step) makes the mean NaN.
    ``lr``: with a scheduler, the lr every step of the epoch trained with (the optimizer's first
    param group's); None without one (the configured lr throughout).
    """

    epoch: int
    train_loss: float
    val_loss: float
    val_acc: float
    test_loss: float
    test_acc: float
    epoch_time: float
    alignment: dict[str, float]
    lr: float | None = None


@dataclasses.dataclass
class History:
    """The completed epochs of a fit; if it diverged, why (the diverged epoch is not included);
    ``stopped``: ``should_stop`` ended it before its last epoch (a pruned sweep trial)."""

    epochs: list[EpochMetrics]
    diverged: bool
    reason: str | None
    stopped: bool = False

    def objective(self, kind: str) -> float:
        """Val loss of the last epoch ("last") or the minimum over epochs ("best").

        math.inf when the run diverged or has no epochs, so that a sweep ranks it last.
        """
        if kind not in ("last", "best"):
            raise ValueError(f"unknown objective kind {kind!r}; allowed: ['best', 'last']")
        if self.diverged or not self.epochs:
            return math.inf
        return self.epochs[-1].val_loss if kind == "last" else self.best_val_loss

    @property
    def best_val_loss(self) -> float:
        """Minimum val loss over the completed epochs (math.inf if there are none)."""
        return min((e.val_loss for e in self.epochs), default=math.inf)

    @property
    def best_epoch(self) -> int:
        """1-based epoch of the minimum val loss (the first one on ties); 0 if there are none."""
        if not self.epochs:
            return 0
        return min(self.epochs, key=lambda e: e.val_loss).epoch


class ScaleMean:
    """The mean of an optimizer's ``last_scales`` over an epoch's steps, kept on its device
    (no host synchronisation per step); None when no step recorded scales."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.steps = 0

    def add(self, scales: torch.Tensor | None) -> None:
        if scales is None:
            return
        if self.total is None:
            self.total = torch.zeros_like(scales)
        self.total.add_(scales)
        self.steps += 1

    def mean(self) -> torch.Tensor | None:
        return None if self.total is None else self.total / self.steps


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    splits: Splits,
    *,
    epochs: int,
    batch_size: int,
    data_seed: int,
    device: torch.device | str,
    eval_batch_size: int | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    should_stop: Callable[[History], bool] | None = None,
) -> History:
    """Train ``model`` with cross-entropy for ``epochs`` epochs and return its history.

    The model (already initialised by the caller) is moved to ``device`` in place, so the
    optimizer's parameter references stay valid. Each epoch visits every training sample once in
    the order of one ``torch.randperm`` drawn from a CPU generator seeded with ``data_seed``
    (independent of the global RNG), in batches of ``batch_size`` with the last one partial.
    ``scheduler.step()`` (no argument) is called once per epoch after its optimizer steps, so
    an epoch's steps share one lr (``EpochMetrics.lr``) and a schedule's length is in epochs,
    whatever the batch size.
    Val and test metrics are computed in eval mode, without gradients: full-batch (the exact mean
    over samples, or over positions for (N, T) targets) when ``eval_batch_size`` is None, else in
    batches of ``eval_batch_size`` in data order, each metric the unweighted mean of the batch
    means (the last, partial batch counts as much as a full one). ``on_epoch`` receives
    each completed epoch's metrics; then ``should_stop`` is asked with the history so far, and
    True before the last epoch ends the fit there (``History.stopped``; asked at the last epoch
    too, so that a pruner sees every epoch). A non-finite train loss (checked once per epoch, on
    the epoch's accumulated loss) or val loss ends the fit with ``History(diverged=True, reason)``;
    nothing is raised and the diverged epoch is neither recorded nor passed to ``on_epoch``.
    """
    positive_int("trainer.epochs", epochs)
    positive_int("trainer.batch_size", batch_size)
    if eval_batch_size is not None:
        positive_int("trainer.eval_batch_size", eval_batch_size)
    model.to(device)
    data = splits.to(device)
    n_train = len(data.y_train)
    if n_train == 0:
        raise ValueError("splits has no training samples")
    batch_sizes = torch.full(((n_train + batch_size - 1) // batch_size,), float(batch_size))
    batch_sizes[-1] = n_train - batch_size * (len(batch_sizes) - 1)
    batch_sizes = batch_sizes.to(device)
    generator = torch.Generator().manual_seed(data_seed)
    names = _parameter_names(model, optimizer) if hasattr(optimizer, "last_scales") else None
    loss_fn = loss_function(data.y_train)
    completed: list[EpochMetrics] = []

    model.train()
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        order = torch.randperm(n_train, generator=generator).to(device)
        losses = []
        scales = ScaleMean()
        lr = None if scheduler is None else float(optimizer.param_groups[0]["lr"])
        for idx in order.split(batch_size):
            optimizer.zero_grad()
            loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            if names is not None:
                scales.add(optimizer.last_scales)
        if scheduler is not None:
            scheduler.step()

        step_losses = torch.stack(losses)
        parts = [((step_losses * batch_sizes).sum() / n_train).view(1)]
        model.eval()
        with torch.no_grad():
            parts.append(_evaluate(model, data.x_val, data.y_val, eval_batch_size, loss_fn))
            parts.append(_evaluate(model, data.x_test, data.y_test, eval_batch_size, loss_fn))
        model.train()
        if (mean := scales.mean()) is not None:
            parts.append(mean)
        values = torch.cat(parts).tolist()  # the epoch's single host synchronisation
        metrics = epoch_outcome(epoch, values, step_losses, time.perf_counter() - start, names, lr)
        if isinstance(metrics, str):
            return History(completed, True, metrics)
        completed.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics)
        stop = should_stop is not None and should_stop(History(completed, False, None))
        if stop and epoch < epochs:
            return History(completed, False, None, stopped=True)
    return History(completed, False, None)


def epoch_outcome(
    epoch: int,
    values: Sequence[float],
    step_losses: torch.Tensor,
    epoch_time: float,
    names: list[str] | None,
    lr: float | None = None,
) -> EpochMetrics | str:
    """An epoch's metrics from its ``values`` [train loss, val loss, val acc, test loss, test
    acc, *mean scales], its per-step train losses and its ``lr``; the reason instead when it
    diverged (a non-finite train or val loss)."""
    train_loss, val_loss, val_acc, test_loss, test_acc, *scales_mean = values
    if not math.isfinite(train_loss):
        return _train_divergence(epoch, step_losses)
    if not math.isfinite(val_loss):
        return f"non-finite val loss at epoch {epoch}"
    return EpochMetrics(
        epoch=epoch,
        train_loss=train_loss,
        val_loss=val_loss,
        val_acc=val_acc,
        test_loss=test_loss,
        test_acc=test_acc,
        epoch_time=epoch_time,
        alignment=_alignment(names, scales_mean),
        lr=lr,
    )


def loss_function(targets: torch.Tensor) -> LossFn:
    """The cross-entropy for ``targets``: over examples (N,), or over all positions (N, T)."""
    return F.cross_entropy if targets.dim() == 1 else _positions_cross_entropy


def _positions_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position: logits (N, T, classes), targets (N, T)."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


def _evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None, loss_fn: LossFn
) -> torch.Tensor:
    """[cross-entropy, accuracy] as one tensor on the device: of the full batch when
    ``batch_size`` is None, else the mean of the batch means over batches of ``batch_size``."""
    if batch_size is None:
        return _metrics(model(x), y, loss_fn)
    batches = zip(x.split(batch_size), y.split(batch_size), strict=True)
    return torch.stack([_metrics(model(xb), yb, loss_fn) for xb, yb in batches]).mean(dim=0)


def _metrics(logits: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    """[mean cross-entropy, accuracy] of one batch (per position for (N, T) targets)."""
    loss = loss_fn(logits, y)
    accuracy = (logits.argmax(dim=-1) == y).to(loss.dtype).mean()
    return torch.stack([loss, accuracy])


def _train_divergence(epoch: int, step_losses: torch.Tensor) -> str:
    """Reason for a non-finite epoch train loss, naming the first non-finite step (1-based)."""
    bad = torch.nonzero(~torch.isfinite(step_losses)).flatten().tolist()
    if not bad:  # every step finite, but their sum overflowed
        return f"non-finite train loss at epoch {epoch} (sum of finite step losses overflowed)"
    value = step_losses[bad[0]].item()
    return f"non-finite train loss ({value}) at epoch {epoch} step {bad[0] + 1}"


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in param_groups order (``param<i>`` if not in model)."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [by_id.get(id(p), f"param{i}") for i, p in enumerate(params)]


def _alignment(names: list[str] | None, scales_mean: list[float]) -> dict[str, float]:
    """Map the epoch's mean scales to parameter names ({} when nothing was recorded)."""
    if names is None or not scales_mean:
        return {}
    if len(scales_mean) != len(names):
        raise ValueError(
            f"optimizer.last_scales has {len(scales_mean)} entries for {len(names)} parameters"
        )
    return dict(zip(names, scales_mean, strict=True))
