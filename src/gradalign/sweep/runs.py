"""A sweep's records in MLflow: the key of its parent run, the parent, the tags its trials carry,
the saved view of its trials.

Every trial of one sweep nests under one parent run. For an Optuna study kept in a storage the
parent belongs to the study (every process sharing it, every resumption of it), otherwise to the
sweep directory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gradalign import processes, tracking
from gradalign.config import flatten
from gradalign.records import source_tags
from gradalign.schema import Metric, MlflowTag, Param, Stage, Tag
from gradalign.tracking import labels


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


def trial_tags(cfg: DictConfig, sweep_dir: str | Path, sweeper: DictConfig) -> dict[str, str]:
    """The tags every trial of a sweep carries: ``sweep_id``, ``sweep_dir`` (this process's
    sweep directory), for a stored study ``optuna_study``, and the trial's number
    ``optuna_trial`` (when the config has it: tracking.optuna_trial)."""
    root = Path(cfg.paths.root)
    key = sweep_id(root, Path(sweep_dir), sweeper)
    tags = {Tag.SWEEP_ID: key, Tag.SWEEP_DIR: _relative(Path(sweep_dir), root)}
    if key.startswith("optuna:"):
        tags[Tag.OPTUNA_STUDY] = OmegaConf.select(sweeper, "study_name")
    if cfg.tracking.optuna_trial is not None:
        tags[Tag.OPTUNA_TRIAL] = str(cfg.tracking.optuna_trial)
    return tags


def create_trial_run(
    store: tracking.Store, cfg: DictConfig, parent_run_id: str, number: int
) -> str:
    """Create the MLflow run of trial ``number`` of the sweep that ``cfg`` (the sweep process's
    config) runs, RUNNING under its parent and owned by this process until the trial's job
    takes it over (start_run with resume_run_id); its id. Once, whatever the store's faults:
    the trial's number under its sweep is the run's key."""
    tags = {
        **trial_tags(cfg, cfg.hydra.sweep.dir, cfg.hydra.sweeper),
        Tag.OPTUNA_TRIAL: str(number),
        Tag.STAGE: Stage.SWEEP,
        Tag.OPTIMIZER: cfg.optimizer.name,
        Tag.OWNER: processes.owner_token(),
        MlflowTag.PARENT_RUN_ID: parent_run_id,
    }
    name = f"{cfg.optimizer.name} (trial {number})"
    key = {k: tags[k] for k in (Tag.SWEEP_ID, Tag.STAGE, Tag.OPTUNA_TRIAL)}
    return store.client.create_run_once(store.experiment_id, tags=tags, run_name=name, key=key)


def trial_run_finder(store_of: Callable[[], tracking.Store], key: str) -> Any:
    """``find(trial)``: the MLflow run id of a trial (a FrozenTrial) of sweep ``key`` (its
    sweep_id): its user attr ``mlflow_run_id``, else (trials of older sweeps) the run tagged with
    its number in the sweep, searched in the store ``store_of()`` gives (asked only then); None
    if it has none."""
    from gradalign.sweep.trial import RUN_ID

    def find(trial: Any) -> str | None:
        if RUN_ID in trial.user_attrs:
            return trial.user_attrs[RUN_ID]
        store = store_of()
        tags = {Tag.SWEEP_ID: key, Tag.STAGE: Stage.SWEEP, Tag.OPTUNA_TRIAL: str(trial.number)}
        found = store.client.search_runs(
            [store.experiment_id], tracking.tag_filter(tags), max_results=1
        )
        return found[0].info.run_id if found else None

    return find


def parent_label(cfg: DictConfig) -> str:
    """What names the sweep that ``cfg`` (the sweep process's config) runs: its Optuna study's
    name for a stored study, else its sweep directory's name."""
    key = sweep_id(Path(cfg.paths.root), Path(cfg.hydra.sweep.dir), cfg.hydra.sweeper)
    if key.startswith("optuna:"):
        return OmegaConf.select(cfg.hydra.sweeper, "study_name")
    return Path(cfg.hydra.sweep.dir).name


def sweep_view_key(cfg: DictConfig) -> str:
    """The key of the saved runs-table view of the sweep's trials (one per sweep_id)."""
    key = sweep_id(Path(cfg.paths.root), Path(cfg.hydra.sweep.dir), cfg.hydra.sweeper)
    return f"sweep-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _searched(cfg: DictConfig) -> list[str]:
    return sorted(OmegaConf.select(cfg.hydra.sweeper, "params") or {})


def save_sweep_view(store: tracking.Store, cfg: DictConfig) -> None:
    """Store the saved view of the sweep's trials on the experiment: sorted by objective (best
    first), with the data set and the searched values as columns, its chart view opening on
    the parallel coordinates of the searched values and the objective over every trial; and
    add the searched values to the experiment's view of all runs."""
    key = sweep_id(Path(cfg.paths.root), Path(cfg.hydra.sweep.dir), cfg.hydra.sweeper)
    metrics = (Metric.OBJECTIVE, Metric.BEST_VAL_LOSS, Metric.BEST_EPOCH, Metric.TEST_ACC)
    searched = [labels.column("params", k) for k in _searched(cfg)]
    columns = [
        *(labels.column("metrics", m) for m in metrics),
        *searched,
        labels.column("tags", Tag.OPTUNA_TRIAL),
        labels.column("attributes", "Dataset"),
    ]
    chart = labels.parallel_chart(_searched(cfg), [Metric.OBJECTIVE])
    tag, value = labels.view_tag(
        sweep_view_key(cfg),
        f"Sweep {parent_label(cfg)} ({cfg.optimizer.name}): trials by {Metric.OBJECTIVE}",
        search_filter=tracking.tag_filter({Tag.STAGE: Stage.SWEEP, Tag.SWEEP_ID: key}),
        columns=columns,
        order_by=labels.column("metrics", Metric.OBJECTIVE),
        ascending=OmegaConf.select(cfg.hydra.sweeper, "direction") != "maximize",
        sections=[labels.ChartSection(f"{Metric.OBJECTIVE} by searched values", (chart,), 1, 480)],
        all_runs_in_charts=True,
    )
    store.client.set_experiment_tag(store.experiment_id, tag, value)
    labels.widen_view(store.client, store.experiment_id, labels.RUNS_VIEW, searched)


def open_parent(store: tracking.Store, cfg: DictConfig, study_key: str | None = None) -> str:
    """The run id of the MLflow parent run of the sweep that ``cfg`` (the sweep process's
    config, with its ``hydra`` node) runs, opened for this process (see
    ``tracking.open_sweep_parent``, which the Optuna storage of a shared study serialises), with
    the saved view of its trials and, for a stored study, its key (tag optuna_study_key). Its
    params are the sweeper settings (search space, n_trials, sampler, storage; passwords
    masked)."""
    sweeper = cfg.hydra.sweeper
    root = Path(cfg.paths.root)
    key = sweep_id(root, Path(cfg.hydra.sweep.dir), sweeper)
    label = parent_label(cfg)
    searched = ", ".join(labels.short_key(k) for k in _searched(cfg)) or "nothing"
    note = (
        f"Optuna sweep of {cfg.optimizer.name} over {searched} (`{key}`, outputs in "
        f"`{cfg.hydra.sweep.dir}`); its trials nest under this run. When the sweep ends, its "
        "best trial and optimisation history are shown here."
    )
    run_id = tracking.open_sweep_parent(
        store,
        sweep_id=key,
        run_name=f"{cfg.optimizer.name} sweep {label}",
        tags={
            Tag.OPTIMIZER: cfg.optimizer.name,
            MlflowTag.NOTE: note,
            **source_tags(str(root), "train.py"),
        },
        params={f"{Param.SWEEPER_PREFIX}{k}": v for k, v in flatten(sweeper, exclude=()).items()},
        storage=OmegaConf.select(sweeper, "storage"),
    )
    if study_key is not None:
        store.client.set_tag(run_id, Tag.STUDY_KEY, study_key)
    save_sweep_view(store, cfg)
    return run_id
