"""A sweep's records in MLflow: the key of its parent run, the parent, the tags its trials carry.

Every trial of one sweep nests under one parent run. For an Optuna study kept in a storage the
parent belongs to the study (every process sharing it, every resumption of it), otherwise to the
sweep directory.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gradalign import tracking
from gradalign.config import flatten
from gradalign.experiment import git_tags
from gradalign.schema import Param, Tag


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


def trial_tags(cfg: DictConfig, *, sweep_dir: Path, sweeper: DictConfig) -> dict[str, str]:
    """The tags every trial of a sweep carries: ``sweep_id``, ``sweep_dir`` (this process's
    sweep directory) and, for a stored study, ``optuna_study``."""
    root = Path(cfg.paths.root)
    key = sweep_id(root, sweep_dir, sweeper)
    tags = {Tag.SWEEP_ID: key, Tag.SWEEP_DIR: _relative(sweep_dir, root)}
    if key.startswith("optuna:"):
        tags[Tag.OPTUNA_STUDY] = OmegaConf.select(sweeper, "study_name")
    return tags


def open_parent(cfg: DictConfig) -> str:
    """The run id of the MLflow parent run of the sweep that ``cfg`` (the sweep process's
    config, with its ``hydra`` node) runs, opened for this process (see
    ``tracking.open_sweep_parent``, which the Optuna storage of a shared study serialises).
    Its params are the sweeper settings (search space, n_trials, sampler, storage; passwords
    masked)."""
    sweeper, sweep_dir = cfg.hydra.sweeper, Path(cfg.hydra.sweep.dir)
    root = Path(cfg.paths.root)
    key = sweep_id(root, sweep_dir, sweeper)
    study = OmegaConf.select(sweeper, "study_name") if key.startswith("optuna:") else None
    return tracking.open_sweep_parent(
        cfg.tracking,
        sweep_id=key,
        run_name=f"{cfg.optimizer.name}-sweep {study or sweep_dir.name}",
        tags={Tag.OPTIMIZER: cfg.optimizer.name, **git_tags(str(root))},
        params={f"{Param.SWEEPER_PREFIX}{k}": v for k, v in flatten(sweeper, exclude=()).items()},
        storage=OmegaConf.select(sweeper, "storage"),
    )
