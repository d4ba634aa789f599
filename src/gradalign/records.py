"""A run's records: what its MLflow run says about it beyond its metrics. Its tags (stage,
optimizer, config hash, the initial weights' hash, git and source), its name and description,
its params (the resolved config) and its dataset input, read from the config, the untrained
model and the Hydra job that runs it (if any). ``run_record`` gathers them as the arguments of
``tracking.start_run``; git_tags and source_tags also tag the report's and the sweep's runs.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import hashlib
import json
import shlex
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gradalign import tracking
from gradalign.config import config_hash, flatten
from gradalign.data import Splits
from gradalign.schema import VALIDATION_CARVED, VALIDATION_ON_TEST, MlflowTag, Stage, Tag
from gradalign.tracking.labels import values_text


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


def dataset_record(cfg: DictConfig, splits: Splits) -> tracking.DatasetRecord:
    """``cfg.dataset`` built as ``splits``, as a dataset input: its digest hashes the data
    set's settings (the generation arguments, the validation carve-out)."""
    settings = {k: v for k, v in flatten(cfg).items() if k.startswith("dataset.")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    sizes = {"train": len(splits.y_train), "val": len(splits.y_val), "test": len(splits.y_test)}
    source = OmegaConf.select(cfg, "dataset.cache_dir") or cfg.dataset._target_
    return tracking.DatasetRecord(
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


def describe(
    cfg: DictConfig, stage: str, values: Mapping[str, Any], tags: Mapping[str, str]
) -> str:
    """The description of a training run (markdown): what it trains and where it belongs; its
    end adds the outcome above."""
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
    if HydraConfig.initialized():  # the train.py command that runs this job alone
        overrides = HydraConfig.get().overrides.task
        command = ["python", "train.py", *(o for o in overrides if not o.startswith("tracking."))]
        lines.append(f"Alone: `{shlex.join(command)}`")  # without the sweeper's bookkeeping
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


def run_record(
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
    found = {key: OmegaConf.select(cfg, key, default=None) for key in searched or ()}
    # the searched keys' values, in the search space's order, but those not a single value
    values = {k: v for k, v in found.items() if v is not None and not OmegaConf.is_config(v)}
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
