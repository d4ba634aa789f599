"""The epoch engine: train classifiers on in-memory splits and return their per-epoch history.

One engine (``fit_models``) trains K models as one: ``Models`` holds one plain model,
``stacked.Stack`` K models stacked into one (a sweep's batch of trials); ``fit`` is the engine
for one model. Each epoch's values travel by name, keyed by ``schema.Metric`` (``EpochMetrics``):
a per-epoch metric is its key in ``Metric.PER_EPOCH``, its computation here, and its line in
docs/tracking.md; the MLflow run logs what the engine computed.

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
from gradalign.schema import Metric


@dataclasses.dataclass(frozen=True)
class EpochMetrics:
    """One completed epoch: its number (1-based) and its values by metric key, every key of
    ``schema.Metric.PER_EPOCH`` and, for an optimizer exposing ``last_scales``,
    ``scale/<parameter name>`` (its mean GAO scale over the epoch's steps; NaN when a step had no
    gradient), and with a scheduler ``lr`` (the lr every step of the epoch trained with: the
    optimizer's first param group's). These keys are what the run logs to MLflow, step =
    epoch."""

    epoch: int
    values: dict[str, float]

    def __getitem__(self, key: str) -> float:
        return self.values[key]


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
        return self.epochs[-1][Metric.VAL_LOSS] if kind == "last" else self.best_val_loss

    @property
    def best_val_loss(self) -> float:
        """Minimum val loss over the completed epochs (math.inf if there are none)."""
        return min((e[Metric.VAL_LOSS] for e in self.epochs), default=math.inf)

    @property
    def best_epoch(self) -> int:
        """1-based epoch of the minimum val loss (the first one on ties); 0 if there are none."""
        if not self.epochs:
            return 0
        return min(self.epochs, key=lambda e: e[Metric.VAL_LOSS]).epoch


class Models:
    """What the epoch engine trains: K models as one, each with its own batches. This base is
    one plain model (K = 1); ``stacked.Stack`` holds K models stacked into one.

    ``active`` lists the models (positions in ``models``) still training; ``params`` maps each
    parameter name to the tensor the optimizer steps."""

    def __init__(self, model: nn.Module) -> None:
        self.models = [model]
        self.active = [0]
        self.params = dict(model.named_parameters())

    def train(self, mode: bool = True) -> None:
        self.models[0].train(mode)

    def backward(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(K,): each active model's loss on its own batch, the rows ``idx[k]`` of (x, y), after
        computing its gradients (each model's parameters get the gradient of its own loss
        only)."""
        rows = idx[0]  # a 1-d index: indexing by (1, B) and then taking [0] is slower
        loss = cross_entropy(self.models[0](x[rows]), y[rows])
        loss.backward()
        return loss.detach().view(1)

    def metrics(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(K, 2): each active model's [mean loss, accuracy] on the shared batch (x, y)."""
        return batch_metrics(self.models[0](x), y).view(1, 2)

    def keep(self, kept: Sequence[int], optimizer: torch.optim.Optimizer) -> None:
        """Go on with the models ``kept`` only (with one model, never asked)."""
        raise NotImplementedError("one model is never cut")

    def unstack(self) -> None:
        """Leave the trained weights in ``models`` (one model's already are)."""


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
    """Train one ``model`` (already initialised by the caller, moved to ``device`` in place, so
    the optimizer's parameter references stay valid): ``fit_models`` of it alone."""
    model.to(device)
    (history,) = fit_models(
        Models(model),
        optimizer,
        splits,
        epochs=epochs,
        batch_size=batch_size,
        data_seeds=[data_seed],
        device=device,
        eval_batch_size=eval_batch_size,
        scheduler=scheduler,
        on_epoch=None if on_epoch is None else lambda _, metrics: on_epoch(metrics),
        should_stop=[should_stop],
    )
    return history


def fit_models(
    models: Models,
    optimizer: torch.optim.Optimizer,
    splits: Splits,
    *,
    epochs: int,
    batch_size: int,
    data_seeds: Sequence[int],
    device: torch.device | str,
    eval_batch_size: int | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_epoch: Callable[[int, EpochMetrics], None] | None = None,
    should_stop: Sequence[Callable[[History], bool] | None] | None = None,
) -> list[History]:
    """The epoch engine: train ``models`` with cross-entropy for ``epochs`` epochs with
    ``optimizer`` (over ``models.params``, on ``device``) and return each model's history.

    Model k's epochs visit every training sample once in the order of one ``torch.randperm``
    drawn from a CPU generator seeded with ``data_seeds[k]`` (independent of the global RNG), in
    batches of ``batch_size`` with the last one partial. ``scheduler.step()`` (no argument) is
    called once per epoch after its optimizer steps, so an epoch's steps share one lr (its
    ``Metric.LR`` value) and a schedule's length is in epochs, whatever the batch size. Val and
    test metrics are computed in eval
    mode, without gradients: full-batch (the exact mean over samples, or over positions for
    (N, T) targets) when ``eval_batch_size`` is None, else in batches of ``eval_batch_size`` in
    data order, each metric the unweighted mean of the batch means (the last, partial batch
    counts as much as a full one). Each epoch ends with a single host synchronisation that
    fetches all of its metrics; ``epoch_time`` is each model's share of the epoch's wall time.

    ``on_epoch(k, metrics)`` receives model k's completed epochs; then ``should_stop[k]`` is
    asked with its history so far, and True before the last epoch ends model k there
    (``History.stopped``; asked at the last epoch too, so that a pruner sees every epoch). A
    non-finite train loss (checked once per epoch, on the epoch's accumulated loss) or val loss
    ends model k with ``History(diverged=True, reason)``; nothing is raised and the diverged
    epoch is neither recorded nor passed to ``on_epoch``. A model that ends leaves the others
    training without it (``Models.keep``); the trained weights are left in ``models.models``.
    """
    positive_int("trainer.epochs", epochs)
    positive_int("trainer.batch_size", batch_size)
    if eval_batch_size is not None:
        positive_int("trainer.eval_batch_size", eval_batch_size)
    n_models = len(models.models)
    if len(data_seeds) != n_models:
        raise ValueError(f"data_seeds has {len(data_seeds)} seeds for {n_models} models")
    should_stop = list(should_stop or [None] * n_models)
    if len(should_stop) != n_models:
        raise ValueError(f"should_stop has {len(should_stop)} entries for {n_models} models")
    if models.active != list(range(n_models)):
        raise ValueError(f"the stack holds models {models.active}, not all {n_models}")
    data = splits.to(device)
    n_train = len(data.y_train)
    if n_train == 0:
        raise ValueError("splits has no training samples")
    batch_sizes = torch.full(((n_train + batch_size - 1) // batch_size, 1), float(batch_size))
    batch_sizes[-1] = n_train - batch_size * (len(batch_sizes) - 1)
    batch_sizes = batch_sizes.to(device)
    generators = [torch.Generator().manual_seed(seed) for seed in data_seeds]
    names = _parameter_names(models, optimizer) if hasattr(optimizer, "last_scales") else None
    histories = [History([], False, None) for _ in range(n_models)]

    models.train()
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        active = models.active
        orders = torch.stack([torch.randperm(n_train, generator=generators[k]) for k in active])
        losses = []
        scale_sum, scale_steps = None, 0  # of the steps' last_scales, on the device
        lr = None if scheduler is None else float(optimizer.param_groups[0]["lr"])
        for idx in orders.to(device).split(batch_size, dim=1):
            optimizer.zero_grad()
            losses.append(models.backward(data.x_train, data.y_train, idx))
            optimizer.step()
            if names is not None and (step_scales := optimizer.last_scales) is not None:
                if scale_sum is None:
                    scale_sum = torch.zeros_like(step_scales)
                scale_sum.add_(step_scales)
                scale_steps += 1
        if scheduler is not None:
            scheduler.step()

        step_losses = torch.stack(losses)  # (steps, K)
        models.train(False)
        with torch.no_grad():
            val = _evaluate(models, data.x_val, data.y_val, eval_batch_size)
            test = _evaluate(models, data.x_test, data.y_test, eval_batch_size)
        models.train()
        columns = {  # each (K,) on the device, by metric key
            Metric.TRAIN_LOSS: (step_losses * batch_sizes).sum(0) / n_train,
            Metric.VAL_LOSS: val[:, 0],
            Metric.VAL_ACC: val[:, 1],
            Metric.TEST_LOSS: test[:, 0],
            Metric.TEST_ACC: test[:, 1],
        }
        if scale_sum is not None:
            mean = scale_sum / scale_steps
            if mean.numel() != len(names) * len(active):
                raise ValueError(
                    f"optimizer.last_scales has {mean.numel()} entries for {len(names)} "
                    f"parameters of {len(active)} models"
                )
            mean = mean.view(len(names), len(active))  # (parameters, K)
            columns |= {
                f"{Metric.ALIGNMENT_PREFIX}{n}": m for n, m in zip(names, mean, strict=True)
            }
        rows = torch.stack(list(columns.values()), 1).tolist()  # the epoch's one host sync
        epoch_time = (time.perf_counter() - start) / len(active)
        going_on = []
        for position, k in enumerate(active):
            values = dict(zip(columns, rows[position], strict=True))
            values[Metric.EPOCH_TIME] = epoch_time
            if lr is not None:
                values[Metric.LR] = lr
            reason = _divergence(epoch, values, step_losses[:, position])
            if reason is not None:
                histories[k] = History(histories[k].epochs, True, reason)
                continue
            metrics = EpochMetrics(epoch, values)
            histories[k].epochs.append(metrics)
            if on_epoch is not None:
                on_epoch(k, metrics)
            stop = should_stop[k] is not None and should_stop[k](histories[k])
            if stop and epoch < epochs:
                histories[k].stopped = True
                continue
            going_on.append(k)
        if not going_on:
            break
        if going_on != active and epoch < epochs:
            models.keep(going_on, optimizer)
    models.unstack()
    return histories


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every prediction: one per example, logits (N, classes) for
    targets (N,), or one per position, logits (N, T, classes) for targets (N, T) (a language
    model's next tokens). For (N,) targets the flattening is a no-op."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


def _evaluate(
    models: Models, x: torch.Tensor, y: torch.Tensor, batch_size: int | None
) -> torch.Tensor:
    """(K, 2): each model's [cross-entropy, accuracy] on the device: of the full batch when
    ``batch_size`` is None, else the mean of the batch means over batches of ``batch_size``."""
    if batch_size is None:
        return models.metrics(x, y)
    batches = zip(x.split(batch_size), y.split(batch_size), strict=True)
    return torch.stack([models.metrics(xb, yb) for xb, yb in batches]).mean(dim=0)


def batch_metrics(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[mean cross-entropy, accuracy] of one batch (per position for (N, T) targets)."""
    loss = cross_entropy(logits, y)
    accuracy = (logits.argmax(dim=-1) == y).to(loss.dtype).mean()
    return torch.stack([loss, accuracy])


def _divergence(epoch: int, values: dict[str, float], step_losses: torch.Tensor) -> str | None:
    """Why the epoch's ``values`` end a fit (a non-finite train or val loss), naming the first
    non-finite step of its per-step train losses; None when they do not."""
    if math.isfinite(values[Metric.TRAIN_LOSS]):
        if math.isfinite(values[Metric.VAL_LOSS]):
            return None
        return f"non-finite val loss at epoch {epoch}"
    bad = torch.nonzero(~torch.isfinite(step_losses)).flatten().tolist()
    if not bad:  # every step finite, but their sum overflowed
        return f"non-finite train loss at epoch {epoch} (sum of finite step losses overflowed)"
    value = step_losses[bad[0]].item()
    return f"non-finite train loss ({value}) at epoch {epoch} step {bad[0] + 1}"


def _parameter_names(models: Models, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in param_groups order (``param<i>`` if not one of
    ``models.params``)."""
    by_id = {id(t): name for name, t in models.params.items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [by_id.get(id(p), f"param{i}") for i, p in enumerate(params)]
