"""Optuna studies kept in a storage: what a storage must be before a sweep opens it, and the
configuration a stored study belongs to.

A study name is a promise that its trials are comparable: resuming it, or sharing it between
processes, with another optimizer, model, data set, budget or search space would mix results
that cannot be ranked together (an Adam trial reported as a GAO sweep's best). The first sweep
of a study records the configuration it ran (user attr ``gradalign.config``); every later sweep
of that study must match it.

A storage on a database server gets its schema created once, by whichever process opens it
first, the others waiting (gradalign.databases).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import optuna.storages._rdb  # where Optuna keeps its schema migrations
from alembic.script import ScriptDirectory
from omegaconf import DictConfig
from optuna.distributions import BaseDistribution

from gradalign import databases
from gradalign.config import NOT_HASHED, flatten
from gradalign.credentials import mask
from gradalign.tracking.store import TrackingUnavailable, check_schema

IDENTITY_ATTR = "gradalign.config"
_SQLITE = "sqlite:///"


def check_storage(url: str) -> None:
    """Raise ValueError unless ``url`` can hold Optuna studies: for a SQLite file, its directory
    exists and the file is absent, empty, or an Optuna database."""
    if not url.startswith(_SQLITE):
        return
    path = Path(url[len(_SQLITE) :])
    if not path.parent.is_dir():
        raise ValueError(
            f"hydra.sweeper.storage={url}: directory {path.parent} does not exist (a relative "
            "path is taken from the repository root); create it or fix the path"
        )
    if not path.exists():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
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
        check_schema(path, script, "Optuna", f"optuna storage upgrade --storage {url}")
    except TrackingUnavailable as error:
        raise ValueError(f"hydra.sweeper.storage: {error}") from None


def open_storage(url: str, wait_s: float) -> optuna.storages.RDBStorage:
    """The Optuna storage at ``url``, its schema created if the database has none, by one
    process at a time on a PostgreSQL server (waiting up to ``wait_s`` for another creator)."""
    try:
        return databases.schema_created(url, lambda: optuna.storages.RDBStorage(url), wait_s)
    except databases.LockTimeout as error:
        raise ValueError(f"hydra.sweeper.storage: {error}") from None


def study_identity(
    cfg: DictConfig, distributions: Mapping[str, BaseDistribution], fixed: Mapping[str, Any]
) -> dict[str, Any]:
    """What makes two sweeps' trials comparable: every hashed setting that the search does not
    vary (``fixed``: the values the sweep's params pin, over the config's), and the search
    space itself."""
    settings = {
        key: str(value)
        for key, value in flatten(cfg, (*NOT_HASHED, "hydra")).items()
        if key not in distributions
    }
    settings |= {key: str(value) for key, value in fixed.items()}
    return {
        "config": settings,
        "search_space": {key: str(d) for key, d in sorted(distributions.items())},
    }


def claim_study(
    storage: optuna.storages.RDBStorage,
    name: str,
    directions: Sequence[Any],
    identity: Mapping[str, Any],
) -> None:
    """Create study ``name`` in ``storage`` (see open_storage) for ``identity``, or check that
    the stored one was made for the same; raise ValueError naming what differs."""
    study = optuna.create_study(
        study_name=name, storage=storage, directions=list(directions), load_if_exists=True
    )
    stored = study.user_attrs.get(IDENTITY_ATTR)
    if stored is None:
        if study.trials:  # a study made before this check existed: adopt it as it is
            return
        study.set_user_attr(IDENTITY_ATTR, dict(identity))
        return
    differences = _differences(stored, identity)
    if differences:
        raise ValueError(
            f"study {name!r} in {mask(storage.url)} belongs to another configuration, so its "
            f"trials cannot be ranked with this sweep's: {'; '.join(differences[:6])}. Use "
            "another hydra.sweeper.study_name, or the stored study's settings"
        )


def _differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: stored -> now`` for each setting or search range that differs."""
    found = []
    for part in ("config", "search_space"):
        old, new = stored.get(part, {}), current.get(part, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                label = key if part == "config" else f"search space of {key}"
                found.append(
                    f"{label}: {old.get(key, '(absent)')} in the study, "
                    f"{new.get(key, '(absent)')} now"
                )
    return found
