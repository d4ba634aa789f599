"""Optuna studies kept in a storage: the study a sweep may work in.

A study name is a promise that its trials are comparable: resuming it, or sharing it between
processes, with another optimizer, model, data set, budget or search space would mix results
that cannot be ranked together (an Adam trial reported as a GAO sweep's best). The first sweep
of a study records what it computes (user attr ``gradalign.config``: every setting but where and
how things run, ``tracking``, ``paths``, ...); every later sweep of that study must match it, and
may run anywhere (another MLflow store, say).

A study also has a key of its own (user attr ``gradalign.study_key``), which its sweep parent in
MLflow carries (tag ``optuna_study_key``): a study that is new, or another one of the same name
(a deleted or replaced storage file), beside an MLflow store that already holds a sweep of that
name is refused, never merged into the old sweep's parent.

Storages are opened by gradalign.optuna_storage, as every other process that reads them.
"""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import optuna.storages._rdb  # where Optuna keeps its schema migrations
from alembic.script import ScriptDirectory
from omegaconf import DictConfig
from optuna.storages import BaseStorage

from gradalign import databases, tracking
from gradalign.config import NOT_HASHED, flatten, hashed
from gradalign.credentials import mask
from gradalign.schema import Stage, Tag
from gradalign.sweep.search_space import SearchSpace
from gradalign.sweep.settings import SQLITE, check_storage_dir

IDENTITY_ATTR = "gradalign.config"
KEY_ATTR = "gradalign.study_key"


def check_storage(url: str, wait_s: float) -> None:
    """Raise ValueError unless ``url`` can hold Optuna studies: for a SQLite file, its directory
    exists and the file is absent, empty, or an Optuna database; StoreUnavailable if another
    process keeps it locked for ``wait_s``."""
    if not url.startswith(SQLITE):
        return
    check_storage_dir(url)
    path = Path(url[len(SQLITE) :])
    if not path.exists():
        return
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=wait_s)
        with contextlib.closing(connection) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    except sqlite3.OperationalError as error:
        if "locked" not in str(error):
            raise ValueError(f"hydra.sweeper.storage={url} cannot be read ({error})") from None
        raise databases.StoreUnavailable(
            f"Optuna storage {url} is locked by another process ({error}; waited "
            f"{wait_s:g} s): the study in it is kept; let that process finish (or stop it), "
            "then rerun the same command"
        ) from None
    except sqlite3.DatabaseError as error:
        raise ValueError(
            f"hydra.sweeper.storage={url} is not a readable SQLite database ({error}); "
            "point it at another file"
        ) from None
    if tables and "studies" not in tables:
        kind = " (it is an MLflow store)" if "experiments" in tables else ""
        raise ValueError(
            f"hydra.sweeper.storage={url} is not an Optuna storage{kind}; point it at another "
            "file, e.g. sqlite:///outputs/optuna.db"
        )
    script = ScriptDirectory(str(Path(optuna.storages._rdb.__file__).parent / "alembic"))
    try:
        databases.check_schema(url, script, "Optuna", f"optuna storage upgrade --storage {url}")
    except databases.StoreUnavailable as error:
        raise ValueError(f"hydra.sweeper.storage: {error}") from None


def study_identity(cfg: DictConfig, space: SearchSpace) -> dict[str, Any]:
    """What makes two sweeps' trials comparable: every hashed setting that the search does not
    vary (the values the sweep's overrides fix, over the config's), and the search space itself.
    Where and how things run (``config.NOT_HASHED``: tracking, paths, ...) is no part of it."""
    settings = {
        key: str(value)
        for key, value in flatten(cfg, (*NOT_HASHED, "hydra")).items()
        if key not in space.distributions
    }
    settings |= _computing(space.fixed)
    return {
        "config": settings,
        "search_space": {key: str(d) for key, d in sorted(space.distributions.items())},
    }


def _computing(fixed: Mapping[str, str]) -> dict[str, str]:
    """The fixed values that say what a sweep computes: all but the keys under
    ``config.NOT_HASHED`` (where and how things run: tracking, paths, ...) and Hydra's own
    settings."""
    return {key: value for key, value in fixed.items() if hashed(key, also=("hydra",))}


def claim_study(
    storage: BaseStorage,
    url: str,
    name: str,
    directions: Sequence[str],
    identity: Mapping[str, Any],
    wait_s: float,
    **options: Any,
) -> tuple[optuna.Study, bool]:
    """Study ``name`` in ``storage`` (opened from ``url``), created for ``identity`` if absent,
    else checked to have been made for the same (ValueError naming what differs); with
    ``options`` (sampler, pruner). (The study, whether this call created it.) Processes that
    claim it together take turns."""
    try:
        with databases.store_lock(url, f"gradalign:study {name}", wait_s):
            new = name not in {s.study_name for s in storage.get_all_studies()}
            study = optuna.create_study(
                study_name=name,
                storage=storage,
                directions=list(directions),
                load_if_exists=True,
                **options,
            )
            stored = study.user_attrs.get(IDENTITY_ATTR)
            if stored is None and (new or not study.trials):
                study.set_user_attr(IDENTITY_ATTR, dict(identity))
            elif stored is not None:  # a study older than this check is taken as it is
                differences = _differences(stored, identity)
                if differences:
                    raise ValueError(
                        f"study {name!r} in {mask(url)} belongs to another configuration, so "
                        f"its trials cannot be ranked with this sweep's: "
                        f"{'; '.join(differences[:6])}. Use another hydra.sweeper.study_name, "
                        "or the stored study's settings"
                    )
            if KEY_ATTR not in study.user_attrs:
                study.set_user_attr(KEY_ATTR, uuid.uuid4().hex)
    except databases.LockTimeout as error:
        raise ValueError(f"hydra.sweeper.storage: {error}") from None
    return study, new


def _differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: stored -> now`` for each setting or search range that differs (settings of where
    and how things run, which older studies recorded, are no difference)."""
    found = []
    for part in ("config", "search_space"):
        old, new = stored.get(part, {}), current.get(part, {})
        if part == "config":
            old = _computing(old)
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                label = key if part == "config" else f"search space of {key}"
                found.append(
                    f"{label}: {old.get(key, '(absent)')} in the study, "
                    f"{new.get(key, '(absent)')} now"
                )
    return found


def check_not_merged(store: tracking.Store, study: optuna.Study, new: bool, url: str) -> None:
    """Raise ValueError if the MLflow store holds a sweep of ``study``'s name that belongs to
    another study: one whose parent carries another study key, or, for a study this sweep has
    just created, a parent with trials already (the storage that held their study was deleted
    or replaced)."""
    parent = tracking.find_sweep_parent(store, f"optuna:{study.study_name}")
    if parent is None:
        return
    key = parent.data.tags.get(Tag.STUDY_KEY)
    if key is None and new:
        trial_runs = store.client.search_runs(
            [store.experiment_id],
            tracking.tag_filter(
                {Tag.STAGE: Stage.SWEEP, Tag.SWEEP_ID: f"optuna:{study.study_name}"}
            ),
            max_results=1,
        )
        if not trial_runs:
            return
    elif key is None or key == study.user_attrs[KEY_ATTR]:
        return
    raise ValueError(
        f"hydra.sweeper.study_name={study.study_name}: the MLflow store "
        f"{store.uri} holds a sweep of that name (parent run "
        f"{parent.info.run_id}) whose Optuna study is not the one in {mask(url)} (that storage "
        "was replaced, or lost the study): point hydra.sweeper.storage at the study's storage, "
        "or use another hydra.sweeper.study_name"
    )
