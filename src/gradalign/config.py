"""The pipeline's reading of a composed Hydra config: the repo-root resolver, early validation,
flattening into MLflow params, and the config hash that identifies equivalent runs.

Validation here covers only the keys no constructor sees before a run opens (trainer, seeds,
objective, tracking, parallel) and one rule for all: every number is finite. Components (data
sets, models, optimizers) validate their own arguments when they are built
(gradalign.components), so each rule has one home.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import math
import os
import shutil
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from gradalign.checks import UserError, is_int, is_number
from gradalign.credentials import mask
from gradalign.hydra_compat import VERSION_BASE, register_resolver

# Keys that say where and how things run, not what is computed: never logged as params nor hashed.
NOT_PARAMS = ("paths", "tracking", "parallel", "reference", "dataset.cache_dir")
# Also left out of the config hash: seeds (the report matches them separately) and execution
# settings that do not change what a run computes.
NOT_HASHED = (*NOT_PARAMS, "seed", "trainer.device", "trainer.threads")


def hashed(key: str, also: tuple[str, ...] = ()) -> bool:
    """Whether the dotted key ``key`` (an override's leading + or ~ ignored) says what a run
    computes: it is under none of NOT_HASHED's keys, nor of ``also``'s."""
    plain = key.lstrip("+~")
    return not any(plain == k or plain.startswith(f"{k}.") for k in (*NOT_HASHED, *also))


# The configs this process validated (by id, dropped with the config): their text then.
_VALIDATED: dict[int, str] = {}


def register_resolvers(repo_root: str | Path) -> None:
    """Register ``${repo_root:}``, which conf/config.yaml uses to anchor outputs, data and MLflow,
    ``${cpu_count:}``, the cores this process may run on (the parallel presets' default number
    of workers), and ``${options:GROUP}`` (``options``).

    Entry points call this with their own directory, so paths do not depend on the working
    directory nor on Hydra's run directory.
    """
    root = str(Path(repo_root).resolve())
    register_resolver("repo_root", lambda: root)
    register_resolver("cpu_count", lambda: len(os.sched_getaffinity(0)))
    register_resolver("options", lambda group: options(root, group))


def options(root: str | Path, group: str) -> str:
    """The options of config group ``group`` (its files in ``root``/conf/, and those a plugin
    registered, such as hydra/sweeper/sampler's), for train.py's --help: ``${options:model}``."""
    names = {path.stem for path in (Path(root) / "conf" / group).glob("*.yaml")}
    with contextlib.suppress(OSError, ValueError):  # a group no plugin registered
        names |= {name.removesuffix(".yaml") for name in ConfigStore.instance().list(group)}
    return ", ".join(sorted(names))


def repo_root() -> Path:
    """The checkout whose conf/ the command-line tools (doctor, stores) read: the working
    directory or one above it, else the one this package was installed from (``pip install -e``).

    The study runs in a checkout (its conf/ is the user's to edit; outputs/ and mlruns/ sit
    beside it): an installed package holds the optimizer and the pipeline's modules, not conf/.
    """
    for folder in (Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parents[2]):
        if (folder / "conf" / "config.yaml").is_file() and (folder / "train.py").is_file():
            return folder
    raise ValueError(
        f"no gradalign checkout (conf/config.yaml and train.py) in {Path.cwd()} or above it: "
        "the study's commands run in a clone of the repository"
    )


class ConfigError(UserError, ValueError):
    """A config value that cannot run; the message names the key, the value and what is allowed."""


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_EXPERIMENT_NAME


# MLflow's limit on an experiment's name (mlflow.utils.validation.MAX_EXPERIMENT_NAME_LENGTH),
# checked here, before MLflow is imported.
MAX_EXPERIMENT_NAME = 500
# The forms of a store URL (dialect://...), and the SQLAlchemy dialects among them: the databases
# MLflow's tracking store and Optuna's storage run on.
DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
TRACKING_STORES = (
    "sqlite:///<file>, postgresql://..., mysql://..., mssql://... or http(s)://<server>"
)
# The top-level keys of conf/config.yaml whose every key the pipeline reads: a key it does not
# know (``+trainer.epoch=3``, a typo of epochs) would be ignored, so it is refused. (``search``
# and ``reference`` are free-form: ranges and published values a preset adds.)
CLOSED_NODES = ("trainer", "seed", "tracking", "paths")
# The config groups of conf/config.yaml's defaults list: top-level keys besides its own.
GROUPS = ("dataset", "model", "optimizer", "scheduler", "parallel", "experiment")


# (key, check, what is allowed); a rule applies when its key is present in the config.
_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("trainer.epochs", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    ("trainer.batch_size", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    (
        "trainer.eval_batch_size",
        lambda v: v is None or (is_int(v) and v >= 1),
        "null or an integer >= 1",
    ),
    ("trainer.device", lambda v: v in ("auto", "cpu", "cuda"), "one of auto, cpu, cuda"),
    ("trainer.threads", lambda v: v is None or (is_int(v) and v >= 1), "null or an integer >= 1"),
    ("seed.model", is_int, "an integer"),
    ("seed.data", is_int, "an integer"),
    ("objective", lambda v: v in ("last", "best"), "one of last, best"),
    ("tracking.flush_interval_s", lambda v: is_number(v) and v >= 0, "a number >= 0"),
    ("tracking.store_wait_s", lambda v: is_number(v) and v > 0, "a number > 0"),
    (
        "tracking.optuna_trial",
        lambda v: v is None or (is_int(v) and v >= 0),
        "null or an int >= 0",
    ),
    ("tracking.parent_run_id", lambda v: v is None or isinstance(v, str), "null or a run id"),
    ("tracking.run_id", lambda v: v is None or isinstance(v, str), "null or a run id"),
    ("tracking.ui_url", lambda v: v is None or _is_url(v), "null or an http(s):// URL"),
    ("tracking.default_ui_url", _is_url, "an http(s):// URL"),
    (
        "tracking.experiment",
        _is_name,
        f"an MLflow experiment name of 1 to {MAX_EXPERIMENT_NAME} characters",
    ),
    (
        "tracking.uri",
        lambda v: v is None or store_form(v) is not None,
        f"null ($MLFLOW_TRACKING_URI, else tracking.default_uri) or {TRACKING_STORES}",
    ),
    ("tracking.optuna_storage", lambda v: v is None or isinstance(v, str), "null or a storage"),
    ("tracking.optuna_study", lambda v: v is None or isinstance(v, str), "null or a study name"),
    ("parallel.workers", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
)
_ABSENT = object()


def checkout_config(overrides: Iterable[str]) -> DictConfig:
    """The checkout's conf/config.yaml (repo_root) with ``overrides``, composed as train.py
    composes it: what the command-line tools (doctor, ui) read the store's settings from."""
    root = repo_root()
    register_resolvers(root)
    with initialize_config_dir(config_dir=str(root / "conf"), **VERSION_BASE):
        return compose("config", overrides=list(overrides))


def anchored_uri(uri: str, root: str | Path) -> str:
    """``uri`` with a relative SQLite path (``sqlite:///outputs/x.db``) made absolute from
    ``root``, so a store does not depend on the working directory; other URIs unchanged."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    path = uri[len(prefix) :]
    if not path or path == ":memory:" or Path(path).is_absolute():
        return uri
    return f"{prefix}{Path(root).resolve() / path}"


def discard_output_dir(folder: Path, *own: str) -> None:
    """Remove the output folder of a command that was refused or stopped before anything ran
    (Hydra makes it before the task starts), if it holds only what Hydra put there (.hydra/,
    the job's log, multirun.yaml) and the files named ``own``; a folder holding anything else
    is left as it is."""
    hydra_made = {".hydra", "multirun.yaml", *own}
    if folder.is_dir() and all(
        entry.name in hydra_made or entry.suffix == ".log" for entry in folder.iterdir()
    ):
        shutil.rmtree(folder, ignore_errors=True)


def hydra_quoted(path: Path) -> str:
    """``path`` as a quoted value of a Hydra override (a comma, a space or a bracket in it
    would otherwise make a sweep over several values or a parse error)."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first invalid setting, naming key, value and what is allowed:
    a key the pipeline does not know (``check_known_keys``), a value a rule refuses, a store
    whose database driver is not installed, a number that is not finite.

    Each entry validates what it is given before it does anything (train.py before torch is
    imported, ``experiment.run_experiment`` for a caller of the library, a sweep's trial before
    it is prepared), and one entry calls the next with the same config: so a config this
    process validated, and that has not changed since, is not checked again.
    """
    text = str(cfg)
    if _VALIDATED.get(id(cfg)) == text:
        return
    check_known_keys(cfg)
    for key, check, allowed in _RULES:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not check(value):
            raise ConfigError(f"invalid config value {mask(f'{key}={value!r}')}: must be {allowed}")
    uri = OmegaConf.select(cfg, "tracking.uri", default=None)
    if uri is not None:
        check_driver("tracking.uri", uri)
    for key, value in flatten(cfg, exclude=("hydra",)).items():
        if not all(math.isfinite(number) for number in _numbers(value)):
            raise ConfigError(f"invalid config value {key}={value!r}: must be finite numbers")
    if id(cfg) not in _VALIDATED:
        weakref.finalize(cfg, _VALIDATED.pop, id(cfg), None)
    _VALIDATED[id(cfg)] = text


@functools.cache
def _known_keys(root: str) -> dict[str, list[str]]:
    """The keys conf/config.yaml (under ``root``) gives each of CLOSED_NODES, and at its top."""
    composition_root = OmegaConf.load(Path(root) / "conf" / "config.yaml")
    known = {node: sorted(composition_root[node]) for node in CLOSED_NODES}
    top = set(composition_root) - {"defaults"}
    known[""] = sorted(top | set(GROUPS) | {"hydra"})
    return known


def check_known_keys(cfg: DictConfig) -> None:
    """Raise ConfigError naming a key that conf/config.yaml does not have, under one of
    CLOSED_NODES or at the top (an appended ``+trainer.epoch=3`` would be ignored), with the
    closest known key and the allowed ones."""
    root = OmegaConf.select(cfg, "paths.root", default=None)
    if root is None or not (Path(root) / "conf" / "config.yaml").is_file():
        return  # not composed from a checkout's conf/ (a config built in code)
    for node, allowed in _known_keys(str(root)).items():
        keys = cfg.keys() if not node else (OmegaConf.select(cfg, node) or {}).keys()
        for key in keys:
            if key not in allowed:
                dotted = f"{node}.{key}" if node else str(key)
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean {node + '.' if node else ''}{close[0]}?)" if close else ""
                where = f"{node} has" if node else "the top-level keys are"
                raise ConfigError(
                    f"unknown config key {dotted}{hint}: nothing reads it; {where} {allowed}"
                )


def store_form(url: Any) -> str | None:
    """The kind of store a URL names (``http``, or a SQLAlchemy dialect of DATABASES), or None
    when it names none (``foo://bar``, ``file:./x``, ``''``, a plain path)."""
    if not isinstance(url, str):
        return None
    if url.startswith(("http://", "https://")) and len(url.split("://", 1)[1]) > 0:
        return "http"
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return "sqlite"
    scheme, separator, rest = url.partition("://")
    dialect = scheme.split("+", 1)[0]
    if separator and rest and dialect in DATABASES and dialect != "sqlite":
        return dialect
    return None


def check_driver(key: str, url: str) -> None:
    """Raise ConfigError if the database URL ``url`` (the value of ``key``) needs a driver that
    is not installed (``mysql://`` without mysqlclient); SQLite and servers need none."""
    if store_form(url) in (None, "http", "sqlite"):
        return
    from sqlalchemy.engine import make_url  # only a database server's URL pays for its import

    try:
        make_url(url).get_dialect().import_dbapi()
    except ImportError as error:
        extra = " (PostgreSQL: pip install 'gradalign[postgres]')" if "postgres" in url else ""
        raise ConfigError(
            f"invalid config value {key}={mask(url)!r}: its database driver is not installed "
            f"({error}); install it{extra}, or use another store"
        ) from None
    except Exception as error:  # SQLAlchemy's refusal of the URL itself (a bad port, say)
        raise ConfigError(f"invalid config value {key}={mask(url)!r}: {error}") from None


def _numbers(value: Any) -> Iterable[float]:
    """The numbers in a config leaf (a number, or a list of them, nested at any depth)."""
    if is_number(value):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)


def flatten(cfg: DictConfig, exclude: Iterable[str] = NOT_PARAMS) -> dict[str, Any]:
    """The resolved config as {dotted key: leaf value}, without the subtrees named in ``exclude``.

    Lists are leaves (``model.hidden`` -> [100, 100]); empty mappings are dropped.
    """
    excluded = set(exclude)
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if dotted in excluded:
                continue
            if isinstance(value, dict):
                walk(value, f"{dotted}.")
            else:
                flat[dotted] = value

    # Top-level keys one by one, so an excluded subtree (hydra's) is never resolved.
    top = {}
    for key in cfg:
        if key not in excluded:
            node = cfg[key]
            top[key] = (
                OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
            )
    walk(top, "")
    return flat


def config_hash(cfg: DictConfig) -> str:
    """12 hex digits identifying what a run computes, independent of seeds, paths and tracking."""
    canonical = json.dumps(flatten(cfg, NOT_HASHED), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
