"""Settings of the report and of the study: conf/report.yaml and conf/study.yaml, overridden by
command-line flags, checked before anything is composed, queried or trained.

A bad value fails here, in milliseconds, with a message naming the key, the value and what is
allowed, rather than after minutes of sweeps.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from gradalign.checks import is_int, is_number
from gradalign.report.stats import TESTED

DIRECTIONS = ("minimize", "maximize")
SUMMARIES = ("audit", "suite")  # the page a study of several parts ends with (report/study.py)


@dataclasses.dataclass(frozen=True)
class ReportSettings:
    """What the report compares and how (see conf/report.yaml for the meaning of each field).

    ``overrides`` are training-config overrides (``model=cnn``); ``name`` is the report folder's
    name under ``<paths.outputs>/report/`` (None: a timestamp); ``command`` is the command line
    recorded in report.md.
    """

    root: Path
    optimizers: tuple[str, ...]
    baseline: str
    seeds: tuple[int, ...]
    final_epochs: int | None  # None: each run's own trainer.epochs (a workload's budget)
    metric: str
    direction: str
    primary: str
    alpha: float
    jobs: int
    overrides: tuple[str, ...] = ()
    name: str | None = None
    command: str = ""
    # Set by a study, which knows its sweeps: extra overrides of one optimizer's runs (on top of
    # ``overrides``), and the sweep (MLflow tag sweep_id) each optimizer's best run is taken from.
    optimizer_overrides: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    sweep_ids: Mapping[str, str] = dataclasses.field(default_factory=dict)
    overwrite: bool = False  # a finished report of this name may be written again (a study's part)

    @property
    def conf_dir(self) -> Path:
        return self.root / "conf"

    def overrides_of(self, optimizer: str) -> tuple[str, ...]:
        """The training-config overrides of ``optimizer``'s runs."""
        return (*self.overrides, *self.optimizer_overrides.get(optimizer, ()))


@dataclasses.dataclass(frozen=True)
class Part:
    """One comparison of a study: which optimizers (None: the report's), with which extra
    training overrides (for all of them, and per optimizer), tuned by a sweep with which sampler
    seed, finally trained on which seeds (None: the report's)."""

    name: str
    label: str
    optimizers: tuple[str, ...] | None = None
    seeds: tuple[int, ...] | None = None
    sweep_seed: int = 0
    overrides: tuple[str, ...] = ()
    optimizer_overrides: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """A study preset (conf/study/<preset>.yaml): the sweeps' trials, the report that follows
    them, and, for a study of several comparisons, its parts, which summary ends it (``audit``:
    claim by claim, grouped into ``columns``; ``suite``: a cross-workload verdict, one part per
    workload)."""

    preset: str
    trials: int
    report: ReportSettings
    parts: tuple[Part, ...]
    columns: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    pruner: str = "none"  # the sweeps' hydra/sweeper/pruner
    summary: str = "audit"
    parallel: str = "serial"  # how each sweep runs its trials: a conf/parallel/ preset


def available_optimizers(root: Path) -> list[str]:
    """Names of the optimizer configs, conf/optimizer/<name>.yaml."""
    return sorted(path.stem for path in (Path(root) / "conf" / "optimizer").glob("*.yaml"))


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for the keys of conf/report.yaml (unset flags keep the file's values), ``--name``,
    and the training-config overrides after ``--``."""
    parser.add_argument("--optimizers", nargs="+", metavar="NAME", help="conf/optimizer names")
    parser.add_argument(
        "--baseline", metavar="NAME", help="the optimizer the others are tested against"
    )
    parser.add_argument("--seeds", nargs="+", type=int, metavar="S", help="seeds of the final runs")
    parser.add_argument("--final-epochs", type=int, metavar="N", help="epochs of each final run")
    parser.add_argument("--metric", help="sweep-run metric that picks the best run")
    parser.add_argument("--direction", choices=DIRECTIONS, help="of --metric")
    parser.add_argument("--primary", choices=TESTED, help="outcome the verdict is about")
    parser.add_argument("--alpha", type=float, help="significance level (two-sided)")
    parser.add_argument("--jobs", type=int, metavar="N", help="trainings at once (default: cores)")
    parser.add_argument("--name", help="report folder name under outputs/report/ (default: time)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="OVERRIDE",
        help="after --: training-config overrides, e.g. model=cnn tracking.experiment=NAME",
    )


def _report_flags(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("optimizers", "baseline", "seeds", "final_epochs", "metric", "direction", "primary")
    flags = {key: getattr(args, key) for key in (*keys, "alpha", "jobs")}
    return {key: value for key, value in flags.items() if value is not None}


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ValueError(f"invalid setting {key}={value!r}: must be {allowed}")


def _check_names(value: Any, allowed: Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        _fail("optimizers", value, f"a list of names from {list(allowed)}")
    names = tuple(value)
    unknown = [name for name in names if name not in allowed]
    if unknown:
        _fail("optimizers", list(names), f"names from {list(allowed)} (unknown: {unknown})")
    if len(names) < 2 or len(set(names)) != len(names):
        _fail("optimizers", list(names), "at least 2 distinct names (a baseline and a challenger)")
    return names


def _check_seeds(value: Any) -> tuple[int, ...]:
    """Distinct integers >= 0; one seed is allowed (a replica of a one-run study), though it
    admits no test."""
    allowed = "a list of distinct integers >= 0 (2 or more for paired tests)"
    if isinstance(value, str) or not isinstance(value, Sequence):
        _fail("seeds", value, allowed)
    seeds = tuple(value)
    if not seeds or len(set(seeds)) != len(seeds) or not all(is_int(s) and s >= 0 for s in seeds):
        _fail("seeds", list(seeds), allowed)
    return seeds


def report_settings(
    root: str | os.PathLike,
    values: Mapping[str, Any] | None = None,
    *,
    overrides: Sequence[str] = (),
    name: str | None = None,
    command: str = "",
) -> ReportSettings:
    """conf/report.yaml under ``root`` updated with ``values``, validated.

    Raises ValueError naming the first bad key, its value and what is allowed.
    """
    root = Path(root).resolve()
    raw = OmegaConf.to_container(OmegaConf.load(root / "conf" / "report.yaml"))
    unknown = set(values or {}) - set(raw)
    if unknown:
        raise ValueError(f"unknown report settings {sorted(unknown)}; allowed: {sorted(raw)}")
    raw.update(values or {})

    optimizers = _check_names(raw["optimizers"], available_optimizers(root))
    if raw["baseline"] not in optimizers:
        _fail("baseline", raw["baseline"], f"one of the optimizers {list(optimizers)}")
    seeds = _check_seeds(raw["seeds"])
    final_epochs = raw["final_epochs"]
    if final_epochs is not None and not (is_int(final_epochs) and final_epochs >= 1):
        _fail("final_epochs", final_epochs, "an integer >= 1, or null (the runs' trainer.epochs)")
    if not (isinstance(raw["metric"], str) and raw["metric"]):
        _fail("metric", raw["metric"], "a metric name, e.g. objective")
    if raw["direction"] not in DIRECTIONS:
        _fail("direction", raw["direction"], f"one of {list(DIRECTIONS)}")
    if raw["primary"] not in TESTED:
        _fail("primary", raw["primary"], f"one of {list(TESTED)}")
    alpha = raw["alpha"]
    if not (is_number(alpha) and 0 < alpha < 1):
        _fail("alpha", alpha, "a number in (0, 1)")
    jobs = raw["jobs"] if raw["jobs"] is not None else (os.cpu_count() or 1)
    if not (is_int(jobs) and jobs >= 1):
        _fail("jobs", jobs, "null or an integer >= 1")
    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        _fail("name", name, "a folder name of letters, digits, '.', '_' and '-'")
    return ReportSettings(
        root=root,
        optimizers=optimizers,
        baseline=raw["baseline"],
        seeds=seeds,
        final_epochs=final_epochs,
        metric=raw["metric"],
        direction=raw["direction"],
        primary=raw["primary"],
        alpha=float(alpha),
        jobs=jobs,
        overrides=tuple(overrides),
        name=name,
        command=command,
    )


def report_settings_from_args(
    root: str | os.PathLike, args: argparse.Namespace, command: str
) -> ReportSettings:
    """ReportSettings from the flags of ``add_report_arguments``."""
    return report_settings(
        root, _report_flags(args), overrides=args.overrides, name=args.name, command=command
    )


def available_parallel(root: str | os.PathLike) -> list[str]:
    """Names of the parallel presets, conf/parallel/<name>.yaml."""
    return sorted(path.stem for path in (Path(root) / "conf" / "parallel").glob("*.yaml"))


def available_pruners(root: str | os.PathLike) -> list[str]:
    """Names of the sweeper's pruner configs, conf/hydra/sweeper/pruner/<name>.yaml."""
    folder = Path(root) / "conf" / "hydra" / "sweeper" / "pruner"
    return sorted(path.stem for path in folder.glob("*.yaml"))


def available_presets(root: str | os.PathLike) -> list[str]:
    """Names of the study presets, conf/study/<name>.yaml."""
    return sorted(path.stem for path in (Path(root) / "conf" / "study").glob("*.yaml"))


def study_settings_from_args(
    root: str | os.PathLike, args: argparse.Namespace, command: str
) -> StudySettings:
    """StudySettings from ``conf/study/<--preset>.yaml``, the flags of ``add_report_arguments``,
    ``--trials``, ``--quick``, ``--pruner`` and ``--parallel``.

    A preset holds ``trials``, ``report`` (values over conf/report.yaml), ``overrides``
    (training overrides, before the user's), optionally ``parts``, ``summary`` and ``columns``
    (a study of several comparisons), ``pruner`` (its sweeps' hydra/sweeper/pruner, default
    none; ``--pruner`` wins), ``parallel`` (how each sweep runs its trials, a conf/parallel/
    preset, default serial; ``--parallel`` wins), and ``quick``: smaller values of the same keys
    for ``--quick``.
    Explicit flags and the user's overrides after ``--`` still win.
    """
    presets = available_presets(root)
    if args.preset not in presets:
        _fail("preset", args.preset, f"one of {presets} (conf/study/)")
    path = Path(root) / "conf" / "study" / f"{args.preset}.yaml"
    study = OmegaConf.to_container(OmegaConf.load(path))
    keys = (
        "trials",
        "report",
        "overrides",
        "parts",
        "summary",
        "columns",
        "pruner",
        "parallel",
        "quick",
    )
    unknown = set(study) - set(keys)
    if unknown:
        _fail("keys of " + str(path.name), sorted(unknown), ", ".join(keys))
    summary = study.get("summary", "audit")
    if summary not in SUMMARIES:
        _fail(f"summary of {path.name}", summary, f"one of {list(SUMMARIES)}")
    quick = study.get("quick", {}) if args.quick else {}
    values = {**study.get("report", {}), **quick.get("report", {}), **_report_flags(args)}
    overrides = [*study.get("overrides", []), *quick.get("overrides", []), *args.overrides]
    report = report_settings(root, values, overrides=overrides, name=args.name, command=command)
    trials = args.trials if args.trials is not None else quick.get("trials", study["trials"])
    if not (is_int(trials) and trials >= 1):
        _fail("trials", trials, "an integer >= 1")
    parts = _parts(study.get("parts") or {"main": {"label": ""}}, report, root)
    columns = {k: tuple(v) for k, v in (study.get("columns") or {}).items()}
    for column, names in columns.items():
        missing = sorted(set(names) - {part.name for part in parts})
        if missing:
            _fail(f"columns.{column}", list(names), f"names of parts (unknown: {missing})")
    pruner = getattr(args, "pruner", None) or quick.get("pruner", study.get("pruner", "none"))
    if pruner not in available_pruners(root):
        _fail("pruner", pruner, f"one of {available_pruners(root)} (conf/hydra/sweeper/pruner/)")
    parallel = getattr(args, "parallel", None) or study.get("parallel", "serial")
    if parallel not in available_parallel(root):
        _fail("parallel", parallel, f"one of {available_parallel(root)} (conf/parallel/)")
    return StudySettings(args.preset, trials, report, parts, columns, pruner, summary, parallel)


def _parts(raw: Mapping[str, Any], report: ReportSettings, root: str | os.PathLike) -> tuple:
    """The parts of a preset, checked like the report's own settings."""
    allowed = available_optimizers(Path(root))
    parts = []
    for name, part in raw.items():
        unknown = set(part) - {f.name for f in dataclasses.fields(Part)}
        if unknown:
            _fail(f"parts.{name}", sorted(unknown), "label, optimizers, seeds, sweep_seed, "
                  "overrides, optimizer_overrides")  # fmt: skip
        optimizers = part.get("optimizers")
        if optimizers is not None:
            optimizers = _check_names(optimizers, allowed)
        seeds = part.get("seeds")
        sweep_seed = part.get("sweep_seed", 0)
        if not is_int(sweep_seed):
            _fail(f"parts.{name}.sweep_seed", sweep_seed, "an integer")
        per_optimizer = part.get("optimizer_overrides", {})
        if set(per_optimizer) - set(optimizers or report.optimizers):
            _fail(
                f"parts.{name}.optimizer_overrides", sorted(per_optimizer), "optimizers it compares"
            )
        parts.append(
            Part(
                name=name,
                label=part.get("label", name),
                optimizers=optimizers,
                seeds=None if seeds is None else _check_seeds(seeds),
                sweep_seed=sweep_seed,
                overrides=tuple(part.get("overrides", [])),
                optimizer_overrides={k: tuple(v) for k, v in per_optimizer.items()},
            )
        )
    return tuple(parts)
