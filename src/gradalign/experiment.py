"""One experiment from a composed config: data, seeded model, optimizer, fit, MLflow run.

Used by train.py (single runs and sweep trials) and by the report (final runs). Everything that
can be wrong with the config fails here before a run is opened in MLflow.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from gradalign import processes, tracking
from gradalign.components import build_dataset, build_model, build_optimizer
from gradalign.config import config_hash, flatten, validate
from gradalign.data import Splits
from gradalign.progress import EpochProgress
from gradalign.schema import VALIDATION_CARVED, VALIDATION_ON_TEST, Stage, Tag
from gradalign.training import EpochMetrics, History, fit

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """trainer.device as a torch.device ("auto": cuda when available); cuda must be available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but CUDA is not available: use auto or cpu")
    return torch.device(device)


@functools.cache
def git_tags(root: str) -> dict[str, str]:
    """git_commit of the checkout at ``root`` and whether tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        return {
            Tag.GIT_COMMIT: git("rev-parse", "HEAD"),
            Tag.GIT_DIRTY: str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower(),
        }
    except (OSError, subprocess.SubprocessError):
        return {Tag.GIT_COMMIT: "unknown"}


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


class TrialResult(float):
    """A run's objective, the value a sweeper optimises, carrying the MLflow run id, for a
    diverged fit why, and for a pruned one the epoch it stopped at; gradalign's Optuna sweeper
    records them on the trial (a pruned one told PRUNED), and any other sweeper sees a plain
    float."""

    def __new__(
        cls,
        value: float,
        run_id: str | None = None,
        failure_reason: str | None = None,
        pruned_epoch: int | None = None,
    ):
        result = super().__new__(cls, value)
        result.run_id = run_id
        result.failure_reason = failure_reason
        result.pruned_epoch = pruned_epoch  # the last epoch of a trial its pruner stopped
        return result


def seeded_model_and_optimizer(
    cfg: DictConfig, splits: Splits
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """``cfg.model`` initialised right after ``torch.manual_seed(cfg.seed.model)``, and
    ``cfg.optimizer`` over its parameters: what a run of ``cfg`` trains."""
    torch.manual_seed(cfg.seed.model)
    model = build_model(cfg, splits)
    return model, build_optimizer(cfg, model.parameters())


def run_experiment(
    cfg: DictConfig,
    *,
    stage: str = Stage.SINGLE,
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
    should_stop: Callable[[History], bool] | None = None,
) -> tuple[History, str]:
    """Train as ``cfg`` says and track it in MLflow; return the history and the MLflow run id.
    ``should_stop`` (a sweep trial's pruner, gradalign.sweep.pruning) may end the fit early:
    see ``training.fit``; the run then ends FINISHED, tagged pruned.

    The model is initialised right after ``torch.manual_seed(cfg.seed.model)`` (on the CPU, so
    equal seeds give equal weights on any device), and tagged ``init_hash``; ``cfg.seed.data``
    orders the mini-batches. A bad config or an unreachable store fails before any of it.
    """
    validate(cfg)
    processes.adopt()  # a worker stops when the process that started it is gone
    tracking.connect(cfg.tracking)
    device = resolve_device(cfg.trainer.device)
    if cfg.trainer.threads is not None:
        torch.set_num_threads(cfg.trainer.threads)
    splits = build_dataset(cfg)
    model, optimizer = seeded_model_and_optimizer(cfg, splits)

    tags = {
        Tag.OPTIMIZER: cfg.optimizer.name,
        Tag.STAGE: stage,
        Tag.CONFIG_HASH: config_hash(cfg),
        Tag.INIT_HASH: init_hash(model),
        Tag.VALIDATION: VALIDATION_ON_TEST if splits.val_is_test else VALIDATION_CARVED,
        **git_tags(str(cfg.paths.root)),
        **(extra_tags or {}),
    }
    if splits.val_is_test:
        log.warning("validation = the test split: what this run selects, it selects on test data")
    job = tags.get(Tag.HYDRA_JOB_NUM)
    run_name = f"{cfg.optimizer.name}-{stage}" + (f"-{job}" if job is not None else "")
    progress = EpochProgress(run_name, cfg.trainer.epochs)

    with tracking.start_run(
        cfg.tracking,
        run_name=run_name,
        tags=tags,
        params=flatten(cfg),
        parent_run_id=parent_run_id,
        artifacts_dir=_hydra_config_dir(),
    ) as run:

        def on_epoch(metrics: EpochMetrics) -> None:
            run.log_epoch(metrics)
            progress.update(metrics)

        try:
            history = fit(
                model,
                optimizer,
                splits,
                epochs=cfg.trainer.epochs,
                batch_size=cfg.trainer.batch_size,
                eval_batch_size=cfg.trainer.eval_batch_size,
                data_seed=cfg.seed.data,
                device=device,
                on_epoch=on_epoch,
                should_stop=should_stop,
            )
        finally:
            progress.close()
        run.finish(history, history.objective(cfg.objective))
    return history, run.run_id
