"""One run of a composed config: data, seeded model, optimizer, fit, MLflow run; or several
that differ only in their seeds and per-model optimizer values (a sweep's batch of trials),
trained as one stacked model, each its own run.

A run is prepared (``prepare_run``: seeded, its MLflow record taken from the Hydra job it belongs
to, gradalign.records), then trained (``train``, alone or with others) by the epoch engine
(``training.fit_models``). ``run_experiment`` does both for one config.

Used by train.py (single runs and sweep trials, gradalign.sweep.trial), by the stacked launcher
(gradalign.sweep.stacked_launcher) and by the report (final runs). Everything that can be wrong
with the config fails here before a run is opened in MLflow, and before MLflow is even imported:
a bad value answers in the time torch takes to import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from gradalign import per_model, processes
from gradalign.components import (
    build,
    build_dataset,
    build_model,
    build_optimizer,
    build_scheduler,
)
from gradalign.config import ConfigError, validate
from gradalign.data import Splits
from gradalign.optim import GradientAlignmentOptimizer
from gradalign.progress import EpochProgress
from gradalign.schema import Stage
from gradalign.stacked import NotStackable, Stack, model_refusal, optimizer_refusal
from gradalign.training import EpochMetrics, History, Models, fit_models

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """trainer.device as a torch.device ("auto": cuda when available); cuda must be available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "invalid config value trainer.device='cuda': CUDA is not available to this torch "
            f"({torch.__version__}): use auto (cuda when available) or cpu"
        )
    return torch.device(device)


def prepare_process(cfg: DictConfig) -> tuple[torch.device, Splits]:
    """Validate ``cfg``, set this process up as a run of it does, and build its data set: the
    device and the splits its runs train on."""
    validate(cfg)
    processes.adopt()  # a worker stops when the process that started it is gone
    device = resolve_device(cfg.trainer.device)
    if cfg.trainer.threads is not None:
        torch.set_num_threads(cfg.trainer.threads)
    splits = build_dataset(cfg)
    if splits.val_is_test:
        log.warning("validation = the test split: what this run selects, it selects on test data")
    return device, splits


def seeded_model(cfg: DictConfig, splits: Splits) -> torch.nn.Module:
    """``cfg.model`` initialised right after ``torch.manual_seed(cfg.seed.model)``."""
    torch.manual_seed(cfg.seed.model)
    return build_model(cfg, splits)


def stack_and_optimizer(
    cfgs: Sequence[DictConfig],
    models: Sequence[torch.nn.Module],
    splits: Splits,
    device: torch.device | str,
) -> tuple[Stack, torch.optim.Optimizer]:
    """``models`` (model k: a run of ``cfgs[k]``; configs equal but for what
    ``per_model.stack_key`` leaves out) on ``device`` and stacked, and the optimizer of
    ``cfgs`` over the stacked tensors (GAO with ``stack_dims=1``; each model's own optimizer
    values through ``per_model``, when they differ); raises NotStackable, with the reason, when
    they cannot train stacked."""
    if len({per_model.stack_key(cfg) for cfg in cfgs}) > 1:
        raise ValueError(
            "configs to train stacked must be equal but for their seeds and per-model optimizer "
            "values (gradalign.per_model)"
        )
    if OmegaConf.select(cfgs[0], "scheduler._target_") is not None:
        raise NotStackable(
            f"scheduler {cfgs[0].scheduler.name!r} cannot train stacked: it steps one "
            "optimizer's lr, where stacked models hold one lr each (gradalign.per_model)"
        )
    models = [model.to(device) for model in models]
    reason = model_refusal(models, splits.x_val[:2].to(device))
    if reason is not None:
        raise NotStackable(f"model {cfgs[0].model.name!r} cannot train stacked: {reason}")
    stack = Stack(models)
    target = get_class(cfgs[0].optimizer._target_)
    options = {"stack_dims": 1} if issubclass(target, GradientAlignmentOptimizer) else {}
    params = list(stack.params.values())
    optimizers = [cfg.optimizer for cfg in cfgs]
    if per_model.varying_keys(optimizers):
        spec = per_model.per_model_spec(optimizers)
        optimizer = build("optimizer", OmegaConf.create(spec), params, **options)
    else:
        optimizer = build_optimizer(cfgs[0], params, **options)
    reason = optimizer_refusal(optimizer)
    if reason is not None:
        raise NotStackable(f"optimizer {cfgs[0].optimizer.name!r} cannot train stacked: {reason}")
    return stack, optimizer


@dataclasses.dataclass
class PreparedRun:
    """A run of ``cfg`` ready to train: its seeded, untrained model and the optimizer over it
    (what it trains alone; trained stacked, the stack gets an optimizer of its own), the
    arguments of its MLflow run (``tracking.start_run``), whether to stop it early (a sweep
    trial's pruner, see ``training.fit``), and the optimizer's lr scheduler (None: none; a run
    with one trains alone)."""

    cfg: DictConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    record: dict[str, Any]
    should_stop: Callable[[History], bool] | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None


def prepare_run(
    cfg: DictConfig,
    splits: Splits,
    *,
    stage: str = Stage.SINGLE,
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
    searched: Iterable[str] | None = None,
    should_stop: Callable[[History], bool] | None = None,
) -> PreparedRun:
    """A run of ``cfg`` (validated, its process set up by ``prepare_process``) on ``splits``,
    with its model seeded and its optimizer built, before MLflow is imported. The
    run's name, description and artifacts come from the Hydra job this is called in; see
    ``run_experiment`` for the arguments."""
    model = seeded_model(cfg, splits)
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = build_scheduler(cfg, optimizer)
    from gradalign import records, tracking  # MLflow: only once the config is known to build

    tracking.connect(cfg.tracking)
    record = records.run_record(cfg, splits, model, stage, parent_run_id, extra_tags, searched)
    return PreparedRun(cfg, model, optimizer, record, should_stop, scheduler)


def run_experiment(
    cfg: DictConfig,
    *,
    stage: str = Stage.SINGLE,
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
    searched: Iterable[str] | None = None,
    should_stop: Callable[[History], bool] | None = None,
) -> tuple[History, str]:
    """Train as ``cfg`` says and track it in MLflow; return the history and the MLflow run id.
    ``stage``, ``parent_run_id`` and ``extra_tags`` place and tag the run; ``should_stop`` (a
    sweep trial's pruner, gradalign.sweep.pruning) may end the fit early: see
    ``training.fit``; the run then ends FINISHED, tagged pruned.

    The model is initialised right after ``torch.manual_seed(cfg.seed.model)`` (on the CPU, so
    equal seeds give equal weights on any device), and tagged ``init_hash``; ``cfg.seed.data``
    orders the mini-batches. The run is named after the optimizer and its values of the
    ``searched`` keys (default: the Hydra job's search space, hydra.sweeper.params). A bad
    config fails before MLflow is imported, an unreachable store before anything is trained.
    """
    device, splits = prepare_process(cfg)
    run = prepare_run(
        cfg,
        splits,
        stage=stage,
        parent_run_id=parent_run_id,
        extra_tags=extra_tags,
        searched=searched,
        should_stop=should_stop,
    )
    ((history, run_id),) = train([run], splits, device)
    return history, run_id


def fit_as_configured(
    cfgs: Sequence[DictConfig],
    models: Models,
    optimizer: torch.optim.Optimizer,
    splits: Splits,
    device: torch.device | str,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_epoch: Callable[[int, EpochMetrics], None] | None = None,
    should_stop: Sequence[Callable[[History], bool] | None] | None = None,
) -> list[History]:
    """``models`` (model k: a run of ``cfgs[k]``) trained by the epoch engine as runs of
    ``cfgs`` train, untracked: cfg.trainer's budget and evaluation, each run's cfg.seed.data
    batch order; the rest as ``training.fit_models`` takes it."""
    trainer = cfgs[0].trainer
    return fit_models(
        models,
        optimizer,
        splits,
        epochs=trainer.epochs,
        batch_size=trainer.batch_size,
        eval_batch_size=trainer.eval_batch_size,
        data_seeds=[cfg.seed.data for cfg in cfgs],
        device=device,
        scheduler=scheduler,
        on_epoch=on_epoch,
        should_stop=should_stop,
    )


def train(
    runs: Sequence[PreparedRun], splits: Splits, device: torch.device
) -> list[tuple[History, str]]:
    """Train the prepared ``runs``, each tracked in its own MLflow run (tags, init_hash, params,
    name, dataset input, per-epoch metrics, status) and stopped by its own ``should_stop``: each
    run's history and run id. One run trains alone; several (configs equal but for what
    ``per_model.stack_key`` leaves out) as one stacked model, or, when they cannot stack
    (``NotStackable``), one by one after a log line saying why."""
    from gradalign import tracking

    first = runs[0]
    if len(runs) == 1:
        models, optimizer = Models(first.model.to(device)), first.optimizer
        label = first.record["run_name"]
    else:
        cfgs = [run.cfg for run in runs]
        try:
            models, optimizer = stack_and_optimizer(cfgs, [r.model for r in runs], splits, device)
        except NotStackable as refusal:
            log.info("training %d runs one by one, not stacked: %s", len(runs), refusal)
            return [result for run in runs for result in train([run], splits, device)]
        label = f"{first.record['run_name']} and {len(runs) - 1} more, stacked"
    progress = EpochProgress(label, first.cfg.trainer.epochs)
    with contextlib.ExitStack() as opened:  # an error ends every run, as start_run says
        tracked = [
            opened.enter_context(tracking.start_run(run.cfg.tracking, **run.record)) for run in runs
        ]

        def on_epoch(k: int, metrics: EpochMetrics) -> None:
            tracked[k].log_epoch(metrics)
            progress.update(metrics)

        try:
            histories = fit_as_configured(
                [run.cfg for run in runs],
                models,
                optimizer,
                splits,
                device,
                scheduler=first.scheduler,  # a run with one trains alone (NotStackable)
                on_epoch=on_epoch,
                should_stop=[run.should_stop for run in runs],
            )
        finally:
            progress.close()
        for one, history, run in zip(tracked, histories, runs, strict=True):
            one.finish(history, history.objective(run.cfg.objective))
    return [(history, one.run_id) for history, one in zip(histories, tracked, strict=True)]
