"""One experiment from a composed config: data, seeded model, optimizer, fit, MLflow run.

Used by train.py (single runs and sweep trials) and by the report (final runs). Everything that
can be wrong with the config fails here before a run is opened in MLflow.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gradalign import tracking
from gradalign.config import config_hash, flatten, validate
from gradalign.data import Splits, load_mnist1d
from gradalign.models import build_model
from gradalign.progress import EpochProgress
from gradalign.training import EpochMetrics, History, fit


def resolve_device(device: str) -> torch.device:
    """trainer.device as a torch.device ("auto": cuda when available); cuda must be available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but CUDA is not available: use auto or cpu")
    return torch.device(device)


def build_optimizer(
    optimizer: DictConfig, params: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    """Instantiate ``optimizer._target_`` with ``params`` and the other keys except ``name``.

    ``name`` is the label used in tags (adam, gao, ...); everything else is a constructor argument,
    e.g. GradientAlignmentOptimizer(params, base="Adam", lr=..., beta=..., target=..., ...).
    """
    spec = OmegaConf.to_container(optimizer, resolve=True)
    spec.pop("name")
    return instantiate(spec, params, _convert_="all")


@functools.cache
def git_tags(root: str) -> dict[str, str]:
    """git_commit of the checkout at ``root`` and whether tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        return {
            "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower(),
        }
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown"}


def _hydra_config_dir() -> Path | None:
    """The running Hydra job's .hydra/ directory (composed config, overrides), if there is one."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is None:
        return None
    path = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir
    return path if path.is_dir() else None


def sweep_id(root: Path, sweep_dir: Path, sweeper: DictConfig) -> str:
    """The key of a sweep's MLflow parent run: ``optuna:<study_name>`` for an Optuna study kept
    in a storage (every process sharing the study, and every resumption of it, nests under one
    parent), else the sweep directory relative to ``root`` (absolute if outside)."""
    storage = OmegaConf.select(sweeper, "storage")
    study = OmegaConf.select(sweeper, "study_name")
    return f"optuna:{study}" if storage and study else _relative(sweep_dir, root)


def _relative(path: Path, root: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(root) if path.is_relative_to(root) else path)


def sweep_parent_run(
    cfg: DictConfig, *, sweep_dir: Path, sweeper: DictConfig
) -> tuple[dict[str, str], str]:
    """(tags every trial of the sweep carries, run id of the sweep's MLflow parent run).

    The parent is keyed by ``sweep_id``; its params are the sweeper settings (search space,
    n_trials, sampler, storage). Trials are tagged ``sweep_id``, ``sweep_dir`` (this process's
    sweep directory) and, for a stored study, ``optuna_study``.
    """
    root = Path(cfg.paths.root)
    key = sweep_id(root, sweep_dir, sweeper)
    study = OmegaConf.select(sweeper, "study_name") if key.startswith("optuna:") else None
    run_id = tracking.sweep_parent(
        cfg.tracking,
        sweep_id=key,
        lock_dir=sweep_dir,
        run_name=f"{cfg.optimizer.name}-sweep {study or sweep_dir.name}",
        tags={"optimizer": cfg.optimizer.name, **git_tags(str(root))},
        params={f"sweeper.{k}": v for k, v in flatten(sweeper, exclude=()).items()},
    )
    tags = {"sweep_id": key, "sweep_dir": _relative(sweep_dir, root)}
    if study:
        tags["optuna_study"] = study
    return tags, run_id


def init_hash(model: torch.nn.Module) -> str:
    """12 hex digits of a model's state (names and values): equal for equal initial weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


class TrialResult(float):
    """A run's objective, the value a sweeper optimises, carrying the MLflow run id and, for a
    diverged fit, why; gradalign's Optuna sweeper records both on the trial, and any other
    sweeper sees a plain float."""

    def __new__(cls, value: float, run_id: str | None = None, failure_reason: str | None = None):
        result = super().__new__(cls, value)
        result.run_id = run_id
        result.failure_reason = failure_reason
        return result


def load_splits(cfg: DictConfig) -> Splits:
    """The train/val/test splits of ``cfg.dataset`` (generated once, then read from the cache)."""
    return load_mnist1d(
        OmegaConf.to_container(cfg.dataset.generation, resolve=True),
        val_fraction=cfg.dataset.val_fraction,
        split_seed=cfg.dataset.split_seed,
        cache_dir=cfg.paths.data_cache,
    )


def seeded_model_and_optimizer(
    cfg: DictConfig, splits: Splits
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """``cfg.model`` initialised right after ``torch.manual_seed(cfg.seed.model)``, and
    ``cfg.optimizer`` over its parameters: what a run of ``cfg`` trains."""
    model_options: dict[str, Any] = OmegaConf.to_container(cfg.model, resolve=True)
    torch.manual_seed(cfg.seed.model)
    model = build_model(
        model_options.pop("name"),
        input_dim=splits.input_dim,
        n_classes=splits.n_classes,
        **model_options,
    )
    return model, build_optimizer(cfg.optimizer, model.parameters())


def run_experiment(
    cfg: DictConfig,
    *,
    stage: str = "single",
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
) -> tuple[History, str]:
    """Train as ``cfg`` says and track it in MLflow; return the history and the MLflow run id.

    The model is initialised right after ``torch.manual_seed(cfg.seed.model)`` (on the CPU, so
    equal seeds give equal weights on any device), and tagged ``init_hash``; ``cfg.seed.data``
    orders the mini-batches. A bad config or an unreachable store fails before any of it.
    """
    validate(cfg)
    tracking.connect(cfg.tracking)
    device = resolve_device(cfg.trainer.device)
    if cfg.trainer.threads is not None:
        torch.set_num_threads(cfg.trainer.threads)
    splits = load_splits(cfg)
    model, optimizer = seeded_model_and_optimizer(cfg, splits)

    tags = {
        "optimizer": cfg.optimizer.name,
        "stage": stage,
        "config_hash": config_hash(cfg),
        "init_hash": init_hash(model),
        **git_tags(str(cfg.paths.root)),
        **(extra_tags or {}),
    }
    job = tags.get("hydra_job_num")
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
                data_seed=cfg.seed.data,
                device=device,
                on_epoch=on_epoch,
            )
        finally:
            progress.close()
        run.finish(history, history.objective(cfg.objective))
    return history, run.run_id
