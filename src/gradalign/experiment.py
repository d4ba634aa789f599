"""One experiment from a composed config: data, seeded model, optimizer, fit, MLflow run; or
several that differ only in their seeds and per-model optimizer values (a report's final seeds,
a sweep's batch of trials), trained as one stacked model, each its own run.

A run is prepared (``prepare_run``: checked, seeded, its MLflow record taken from the Hydra job
it belongs to), then trained (``train_alone``, or ``train_together`` with others).

Used by train.py (single runs and sweep trials), by the stacked launcher (gradalign.sweep.
stacked_launcher) and by the report (final runs). Everything that
can be wrong with the config fails here before a run is opened in MLflow, and before MLflow is
even imported: a bad value answers in the time torch takes to import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import getpass
import hashlib
import json
import logging
import shlex
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
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
from gradalign.config import ConfigError, config_hash, flatten, validate
from gradalign.data import Splits
from gradalign.optim import GradientAlignmentOptimizer
from gradalign.progress import EpochProgress
from gradalign.schema import VALIDATION_CARVED, VALIDATION_ON_TEST, MlflowTag, Stage, Tag
from gradalign.stacked import NotStackable, Stack, fit_stacked, model_refusal, optimizer_refusal
from gradalign.training import EpochMetrics, History, fit

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


@functools.cache
def git_tags(root: str) -> dict[str, str]:
    """git_commit of the checkout at ``root`` and whether tracked files differ from it, also
    under MLflow's own keys (the run page shows the commit and branch), with the URL of the
    ``origin`` remote when there is one."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower()
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return {Tag.GIT_COMMIT: "unknown"}
    tags = {
        Tag.GIT_COMMIT: commit,
        Tag.GIT_DIRTY: dirty,
        MlflowTag.GIT_COMMIT: commit,
        MlflowTag.GIT_DIRTY: dirty,
        MlflowTag.GIT_BRANCH: branch,
    }
    with contextlib.suppress(subprocess.SubprocessError):  # no remote called origin
        tags[MlflowTag.GIT_REPO_URL] = git("remote", "get-url", "origin")
    return tags


def source_tags(root: str, script: str) -> dict[str, str]:
    """MLflow's source tags of a run made by the entry point ``script`` (the runs table's Source
    column), its user, and git_tags."""
    tags = {MlflowTag.SOURCE_TYPE: "LOCAL", MlflowTag.SOURCE_NAME: script, **git_tags(root)}
    with contextlib.suppress(KeyError, OSError):  # no user name for this uid (a container)
        tags[MlflowTag.USER] = getpass.getuser()
    return tags


def searched_values(cfg: DictConfig, keys: Iterable[str]) -> dict[str, Any]:
    """The values in ``cfg`` of the searched ``keys`` (a search space's), in their order, without
    the keys that are not a single value in ``cfg``."""
    found = {key: OmegaConf.select(cfg, key, default=None) for key in keys}
    return {k: v for k, v in found.items() if v is not None and not OmegaConf.is_config(v)}


def dataset_record(cfg: DictConfig, splits: Splits) -> Any:
    """``cfg.dataset`` built as ``splits``, as a dataset input: its digest hashes the data
    set's settings (the generation arguments, the validation carve-out)."""
    from gradalign.tracking import DatasetRecord

    settings = {k: v for k, v in flatten(cfg).items() if k.startswith("dataset.")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    sizes = {"train": len(splits.y_train), "val": len(splits.y_val), "test": len(splits.y_test)}
    source = OmegaConf.select(cfg, "dataset.cache_dir") or cfg.dataset._target_
    return DatasetRecord(
        name=cfg.dataset.name,
        digest=digest.hexdigest()[:12],
        source=str(source),
        profile={"num_rows": sum(sizes.values()), **sizes, "classes": splits.n_classes},
        schema={
            "features": (
                str(splits.x_train.dtype).removeprefix("torch."),
                [-1, *splits.input_shape],
            ),
            "targets": (
                str(splits.y_train.dtype).removeprefix("torch."),
                [-1, *splits.y_train.shape[1:]],  # (N, T) for a language model's next tokens
            ),
        },
    )


def _command(cfg: DictConfig) -> str | None:
    """The train.py command that runs this job alone, when Hydra runs it (its task overrides
    but the sweeper's tracking.* bookkeeping)."""
    if not HydraConfig.initialized():
        return None
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("tracking.")]
    return shlex.join(["python", "train.py", *overrides])


def describe(
    cfg: DictConfig, stage: str, values: Mapping[str, Any], tags: Mapping[str, str]
) -> str:
    """The description of a training run (markdown): what it trains and where it belongs; its
    end adds the outcome above."""
    from gradalign.tracking.labels import values_text

    what = values_text(values) or "config defaults"
    lines = [
        f"{cfg.optimizer.name} ({what}) on {cfg.dataset.name} / {cfg.model.name}: "
        f"{cfg.trainer.epochs} epochs, batch {cfg.trainer.batch_size}, seed.model "
        f"{cfg.seed.model}, seed.data {cfg.seed.data}."
    ]
    if stage == Stage.SWEEP:
        trial = tags.get(Tag.OPTUNA_TRIAL, tags.get(Tag.HYDRA_JOB_NUM, "?"))
        lines.append(f"Trial {trial} of sweep `{tags.get(Tag.SWEEP_ID)}`, nested under its parent.")
    elif stage == Stage.FINAL:
        lines.append(f"Final run retraining sweep run `{tags.get(Tag.SELECTED_FROM)}`.")
    command = _command(cfg)
    if command is not None:
        lines.append(f"Alone: `{command}`")
    return "\n\n".join(lines)


def _detail(cfg: DictConfig, stage: str, tags: Mapping[str, str]) -> str:
    """What a run is, for its name: ``single``, ``trial 7``, ``final, seed 3``."""
    if stage == Stage.SWEEP:
        if Tag.OPTUNA_TRIAL in tags:
            return f"trial {tags[Tag.OPTUNA_TRIAL]}"
        return f"job {tags.get(Tag.HYDRA_JOB_NUM, '?')}"
    if stage == Stage.FINAL:
        return f"final, seed {cfg.seed.model}"
    return stage


def _hydra_config_dir() -> Path | None:
    """The running Hydra job's .hydra/ directory (composed config, overrides), if there is one."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is None:
        return None
    path = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir
    return path if path.is_dir() else None


def init_hash(model: torch.nn.Module) -> str:
    """12 hex digits of a model's state (names and values): equal for equal initial weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def seeded_model(cfg: DictConfig, splits: Splits) -> torch.nn.Module:
    """``cfg.model`` initialised right after ``torch.manual_seed(cfg.seed.model)``."""
    torch.manual_seed(cfg.seed.model)
    return build_model(cfg, splits)


def seeded_model_and_optimizer(
    cfg: DictConfig, splits: Splits
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """``seeded_model(cfg)`` and ``cfg.optimizer`` over its parameters: what a run of ``cfg``
    trains."""
    model = seeded_model(cfg, splits)
    return model, build_optimizer(cfg, model.parameters())


def seeded_stack_and_optimizer(
    cfgs: Sequence[DictConfig], splits: Splits, device: torch.device | str
) -> tuple[Stack, torch.optim.Optimizer]:
    """``stack_and_optimizer`` of the ``seeded_model`` of each of ``cfgs``."""
    return stack_and_optimizer(cfgs, [seeded_model(cfg, splits) for cfg in cfgs], splits, device)


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


def _budget(cfg: DictConfig) -> dict[str, Any]:
    """cfg.trainer's budget and evaluation, as fit and fit_stacked take them."""
    trainer = cfg.trainer
    return {
        "epochs": trainer.epochs,
        "batch_size": trainer.batch_size,
        "eval_batch_size": trainer.eval_batch_size,
    }


def fit_as_configured(
    cfg: DictConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    splits: Splits,
    device: str,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    should_stop: Callable[[History], bool] | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> History:
    """Train ``model`` with ``optimizer`` (and its lr ``scheduler``, built by
    ``components.build_scheduler``) on ``splits`` as a run of ``cfg`` does (cfg.trainer's
    budget and evaluation, cfg.seed.data's batch order), untracked; ``should_stop`` as in
    ``training.fit``."""
    return fit(
        model,
        optimizer,
        splits,
        **_budget(cfg),
        data_seed=cfg.seed.data,
        device=device,
        scheduler=scheduler,
        on_epoch=on_epoch,
        should_stop=should_stop,
    )


def fit_stacked_as_configured(
    cfgs: Sequence[DictConfig],
    stack: Stack,
    optimizer: torch.optim.Optimizer,
    splits: Splits,
    device: torch.device | str,
    on_epoch: Callable[[int, EpochMetrics], None] | None = None,
    should_stop: Sequence[Callable[[History], bool] | None] | None = None,
) -> list[History]:
    """``fit_as_configured`` of each of ``cfgs``, trained stacked (``stacked.fit_stacked``):
    model k in ``stack`` with ``cfgs[k].seed.data``'s batch order and ``should_stop[k]``."""
    return fit_stacked(
        stack,
        optimizer,
        splits,
        **_budget(cfgs[0]),
        data_seeds=[c.seed.data for c in cfgs],
        device=device,
        on_epoch=on_epoch,
        should_stop=should_stop,
    )


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


def _run_record(
    cfg: DictConfig,
    splits: Splits,
    model: torch.nn.Module,
    stage: str,
    parent_run_id: str | None,
    extra_tags: Mapping[str, str] | None,
    searched: Iterable[str] | None,
) -> dict[str, Any]:
    """The ``tracking.start_run`` arguments of a run of ``cfg`` training ``model`` (untrained:
    its init_hash is taken now), read in the Hydra job that runs it (if any)."""
    from gradalign import tracking

    tags = {
        Tag.OPTIMIZER: cfg.optimizer.name,
        Tag.SCHEDULER: OmegaConf.select(cfg, "scheduler.name", default=None) or "none",
        Tag.STAGE: stage,
        Tag.CONFIG_HASH: config_hash(cfg),
        Tag.INIT_HASH: init_hash(model),
        Tag.VALIDATION: VALIDATION_ON_TEST if splits.val_is_test else VALIDATION_CARVED,
        **source_tags(str(cfg.paths.root), "train.py"),
        **(extra_tags or {}),
    }
    if searched is None and HydraConfig.initialized():
        searched = OmegaConf.select(HydraConfig.get(), "sweeper.params") or {}
    values = searched_values(cfg, searched or ())
    return {
        "run_name": tracking.run_name(cfg.optimizer.name, values, _detail(cfg, stage, tags)),
        "tags": tags,
        "params": flatten(cfg),
        "parent_run_id": parent_run_id,
        "artifacts_dir": _hydra_config_dir(),
        "description": describe(cfg, stage, values, tags),
        "dataset": dataset_record(cfg, splits),
        "created_run_id": cfg.tracking.run_id,  # a sweep trial's: its sweep made the run
    }


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
    model, optimizer = seeded_model_and_optimizer(cfg, splits)
    scheduler = build_scheduler(cfg, optimizer)
    from gradalign import tracking  # MLflow: only once the config is known to build

    tracking.connect(cfg.tracking)
    record = _run_record(cfg, splits, model, stage, parent_run_id, extra_tags, searched)
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
    return train_alone(run, splits, device)


def train_alone(run: PreparedRun, splits: Splits, device: torch.device) -> tuple[History, str]:
    """Train the prepared ``run`` on its own, tracked in MLflow: its history and run id."""
    from gradalign import tracking

    cfg = run.cfg
    progress = EpochProgress(run.record["run_name"], cfg.trainer.epochs)
    with tracking.start_run(cfg.tracking, **run.record) as tracked:

        def on_epoch(metrics: EpochMetrics) -> None:
            tracked.log_epoch(metrics)
            progress.update(metrics)

        try:
            history = fit_as_configured(
                cfg,
                run.model,
                run.optimizer,
                splits,
                device,
                on_epoch,
                run.should_stop,
                run.scheduler,
            )
        finally:
            progress.close()
        tracked.finish(history, history.objective(cfg.objective))
    return history, tracked.run_id


def train_together(
    runs: Sequence[PreparedRun], splits: Splits, device: torch.device
) -> list[tuple[History, str]]:
    """Train the prepared ``runs`` (configs equal but for what ``per_model.stack_key`` leaves
    out) as one stacked model (``stacked.fit_stacked``), each its own MLflow run, logged as
    ``train_alone`` logs it (tags, init_hash, params, name, dataset input, per-epoch metrics,
    status) and stopped by its own ``should_stop``. Runs that cannot stack (``NotStackable``)
    are trained one by one instead, after a log line saying why."""
    from gradalign import tracking

    if len(runs) == 1:
        return [train_alone(runs[0], splits, device)]
    cfgs = [run.cfg for run in runs]
    try:
        stack, optimizer = stack_and_optimizer(cfgs, [run.model for run in runs], splits, device)
    except NotStackable as refusal:
        log.info("training %d runs one by one, not stacked: %s", len(runs), refusal)
        return [train_alone(run, splits, device) for run in runs]
    label = f"{runs[0].record['run_name']} and {len(runs) - 1} more, stacked"
    progress = EpochProgress(label, cfgs[0].trainer.epochs)
    with contextlib.ExitStack() as opened:  # an error ends every run, as start_run says
        tracked = [
            opened.enter_context(tracking.start_run(run.cfg.tracking, **run.record)) for run in runs
        ]

        def on_epoch(k: int, metrics: EpochMetrics) -> None:
            tracked[k].log_epoch(metrics)
            progress.update(metrics)

        try:
            histories = fit_stacked_as_configured(
                cfgs, stack, optimizer, splits, device, on_epoch, [r.should_stop for r in runs]
            )
        finally:
            progress.close()
        for one, history, cfg in zip(tracked, histories, cfgs, strict=True):
            one.finish(history, history.objective(cfg.objective))
    return [(history, one.run_id) for history, one in zip(histories, tracked, strict=True)]


def run_stacked_experiments(
    cfgs: Sequence[DictConfig],
    *,
    stage: str = Stage.SINGLE,
    parent_run_id: str | None = None,
    extra_tags: Sequence[Mapping[str, str] | None] | None = None,
    searched: Iterable[str] | None = None,
) -> list[tuple[History, str]]:
    """``run_experiment`` of each of ``cfgs`` (equal but for their seeds, or per-model optimizer
    values), trained together (``train_together``), with ``extra_tags[k]`` for run k."""
    extra_tags = list(extra_tags or [None] * len(cfgs))
    for cfg in cfgs[1:]:
        validate(cfg)
    device, splits = prepare_process(cfgs[0])
    searched = None if searched is None else list(searched)
    runs = [
        prepare_run(
            cfg,
            splits,
            stage=stage,
            parent_run_id=parent_run_id,
            extra_tags=tags,
            searched=searched,
        )
        for cfg, tags in zip(cfgs, extra_tags, strict=True)
    ]
    return train_together(runs, splits, device)
