"""Settings of the report and of the study, each key declared once, below, as a field with what
it means and allows (report.keys): its values come from conf/report.yaml and the study preset
conf/study/<preset>.yaml, overridden by command-line flags of the same names; its flag, its
--help line and its check all derive from the declaration. Adding a report key is its field
here, its line in conf/report.yaml, and its use.

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

from gradalign.config import ConfigError
from gradalign.report import keys
from gradalign.report.keys import key
from gradalign.report.stats import TESTED

DIRECTIONS = ("minimize", "maximize")
REPORT_YAML = Path("conf") / "report.yaml"
SUMMARIES = ("audit", "suite")  # the page a study of several parts ends with (report/study.py)
# What a list of optimizers and a list of seeds allow, for the report's keys and a part's.
OPTIMIZERS = {
    "allowed": "at least 2 distinct names (a baseline and a challenger)",
    "valid": lambda names: len(names) >= 2 and len(set(names)) == len(names),
    "group": "optimizer",
}
SEEDS = {
    "allowed": "a list of distinct integers >= 0",
    "valid": lambda seeds: bool(seeds) and len(set(seeds)) == len(seeds) and min(seeds) >= 0,
}
POSITIVE = {"allowed": "an integer >= 1", "valid": lambda n: n >= 1}


@dataclasses.dataclass(frozen=True)
class ReportSettings:
    """What the report compares and how: the keys of conf/report.yaml, then what the command or
    a study adds (``overrides``: training-config overrides such as ``model=cnn``; ``command``:
    the command line recorded in report.md)."""

    root: Path
    optimizers: tuple[str, ...] = key(
        "the optimizers compared, conf/optimizer/ names", metavar="NAME", **OPTIMIZERS
    )
    baseline: str = key("the optimizer every other one is tested against", metavar="NAME")
    seeds: tuple[int, ...] = key(
        "seeds of the final runs: seed.model = seed.data = s for every optimizer, disjoint "
        "from the sweeps' (0)",
        metavar="S",
        **SEEDS,
    )
    final_epochs: int | None = key(
        "epochs of each final run (null: each run's own trainer.epochs)",
        allowed="an integer >= 1, or null (the runs' trainer.epochs)",
        valid=POSITIVE["valid"],
        metavar="N",
    )
    metric: str = key(
        "sweep-run metric that picks each optimizer's best run",
        allowed="a metric name, e.g. objective",
        valid=bool,
    )
    direction: str = key("of --metric", choices=DIRECTIONS)
    primary: str = key("per-seed outcome the verdict is about", choices=TESTED)
    alpha: float = key(
        "two-sided significance level of the paired tests",
        allowed="a number in (0, 1)",
        valid=lambda alpha: 0 < alpha < 1,
    )
    min_pairs: int = key(
        "fewest seeds (where both runs completed) a comparison needs for a verdict; with "
        "fewer it is a smoke run: its numbers, no verdict",
        allowed="an integer >= 2",
        valid=lambda n: n >= 2,
        metavar="N",
    )
    sweeps: tuple[str, ...] | None = key(
        "the sweeps to take each optimizer's best from, one per optimizer: sweep_id tags or "
        "Optuna study names (null: the latest complete sweep of each with the report's "
        "settings; sweeps are never pooled)",
        allowed="null, or a list of distinct sweep ids",
        valid=lambda ids: bool(ids) and len(set(ids)) == len(ids),
        metavar="ID",
    )
    unequal_budgets: bool = key(
        "compare optimizers whose sweeps spent unequal tuning budgets (trials counted, "
        "pruner) instead of refusing them; the verdict then says so"
    )
    jobs: int | None = key(
        "trainings run at once (null: one per core)",
        allowed="null or an integer >= 1",
        valid=POSITIVE["valid"],
        metavar="N",
        param=False,
    )
    name: str | None = key(
        "the report's folder under <outputs>/report/ (null: the date and time)",
        allowed="a folder name of letters, digits, '.', '_' and '-'",
        valid=lambda name: re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) is not None,
        param=False,
    )
    overrides: tuple[str, ...] = ()
    command: str = ""
    # Set by a study: extra overrides of one optimizer's runs (on top of ``overrides``),
    # whether a finished report of this name may be written again (a study's part), and whether
    # the whole study is a smoke run (--quick), whose numbers never make a verdict.
    optimizer_overrides: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    overwrite: bool = False
    smoke: bool = False

    @property
    def conf_dir(self) -> Path:
        return self.root / "conf"

    def overrides_of(self, optimizer: str) -> tuple[str, ...]:
        """The training-config overrides of ``optimizer``'s runs."""
        return (*self.overrides, *self.optimizer_overrides.get(optimizer, ()))


@dataclasses.dataclass(frozen=True)
class Part:
    """One comparison of a study (a key of the preset's ``parts``): which optimizers, with which
    extra training overrides (for all of them, and per optimizer), tuned by a sweep with which
    sampler seed, finally trained on which seeds."""

    name: str
    label: str | None = key("what the part is, in the summary (null: its name)", default=None)
    optimizers: tuple[str, ...] | None = key(
        "the optimizers it compares (null: the report's)", default=None, **OPTIMIZERS
    )
    seeds: tuple[int, ...] | None = key(
        "its final seeds (null: the report's)", default=None, **SEEDS
    )
    sweep_seed: int = key("the seed of its sweeps' sampler", default=0)
    overrides: tuple[str, ...] = key("training overrides of all its runs", default=())
    optimizer_overrides: Mapping[str, tuple[str, ...]] = key(
        "training overrides of one optimizer's runs", default={}
    )


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """A study: its preset (conf/study/<preset>.yaml, whose keys are below, beside ``report``:
    values over conf/report.yaml, ``overrides``: training overrides of every run, before the
    user's, ``parts``: several comparisons, and ``quick``: smaller values of the same keys, for
    --quick); the report that follows its sweeps; for a study of several comparisons its parts
    and the summary that ends it (``audit``: claim by claim, grouped into ``columns``;
    ``suite``: a cross-workload verdict, one part per workload)."""

    report: ReportSettings
    parts: tuple[Part, ...]
    preset: str = key(
        "the study preset, conf/study/<name>.yaml", group="study", yaml=False, metavar="NAME"
    )
    trials: int = key("Optuna trials per sweep", metavar="N", **POSITIVE)
    quick: bool = key(
        "the preset's quick budgets: the whole pipeline in seconds, a smoke run (no verdict)",
        yaml=False,
        default=False,
    )
    pruner: str = key(
        "the sweeps' trial pruner, conf/hydra/sweeper/pruner/",
        group="hydra/sweeper/pruner",
        metavar="NAME",
        default="none",
    )
    parallel: str = key(
        "how each sweep runs its trials, conf/parallel/",
        group="parallel",
        metavar="NAME",
        default="serial",
    )
    summary: str = key(
        "the page a study of several parts ends with",
        choices=SUMMARIES,
        flag=False,
        default="audit",
    )
    columns: Mapping[str, tuple[str, ...]] = key(
        "an audit's columns: the parts each one reads", flag=False, default={}
    )


PRESET_KEYS = ("report", "overrides", "parts", "quick")  # the preset's keys that are not fields
# The value of each study flag when it is not given, as its help says.
STUDY_FLAGS = {
    "preset": "default",
    "trials": "the preset's",
    "pruner": "the preset's, or none",
    "parallel": "the preset's, or serial",
}


def add_report_arguments(parser: argparse.ArgumentParser, root: str | os.PathLike) -> None:
    """A flag per report key (not given: conf/report.yaml's value, which the help shows), and
    the training-config overrides after ``--``."""
    keys.add_flags(parser, ReportSettings, root, OmegaConf.load(Path(root) / REPORT_YAML))
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="OVERRIDE",
        help="after --: training-config overrides, e.g. model=cnn tracking.experiment=NAME",
    )


def add_study_arguments(parser: argparse.ArgumentParser, root: str | os.PathLike) -> None:
    """The study's flags (``--suite`` = ``--preset suite``), then the report's."""
    keys.add_flags(parser, StudySettings, root, STUDY_FLAGS)
    parser.add_argument(
        "--suite", action="store_const", const="suite", dest="preset", help="= --preset suite"
    )
    add_report_arguments(parser, root)


def report_settings(
    root: str | os.PathLike,
    values: Mapping[str, Any] | None = None,
    *,
    overrides: Sequence[str] = (),
    command: str = "",
    smoke: bool = False,
) -> ReportSettings:
    """conf/report.yaml under ``root`` updated with ``values``, checked.

    Raises ConfigError naming the first bad key, its value and what is allowed.
    """
    root = Path(root).resolve()
    raw = OmegaConf.to_container(OmegaConf.load(root / REPORT_YAML))
    missing = sorted(set(keys.keys(ReportSettings)) - set(raw))
    if missing:
        raise ConfigError(f"{REPORT_YAML} lacks the keys {missing}")
    checked = keys.read(ReportSettings, {**raw, **(values or {})}, root, what="report settings")
    optimizers = list(checked["optimizers"])
    if checked["baseline"] not in optimizers:
        keys.fail("baseline", checked["baseline"], f"one of the optimizers {optimizers}")
    checked["jobs"] = checked["jobs"] or os.cpu_count() or 1
    return ReportSettings(
        root=root, overrides=tuple(overrides), command=command, smoke=smoke, **checked
    )


def report_settings_from_args(
    root: str | os.PathLike, args: argparse.Namespace, command: str
) -> ReportSettings:
    """ReportSettings from the flags of ``add_report_arguments``."""
    values = keys.given(args, ReportSettings)
    return report_settings(root, values, overrides=args.overrides, command=command)


def study_settings_from_args(
    root: str | os.PathLike, args: argparse.Namespace, command: str
) -> StudySettings:
    """StudySettings from ``conf/study/<--preset>.yaml``, with its ``quick`` values for
    ``--quick``, then the flags and the user's overrides after ``--``, which win."""
    root = Path(root)
    if getattr(args, "sweeps", None):
        keys.fail("sweeps", args.sweeps, "unset for study.py, which reports on its own sweeps")
    given = {"preset": STUDY_FLAGS["preset"], **keys.given(args, StudySettings)}
    flags = keys.read(StudySettings, given, root, source="flag")
    preset = flags["preset"]
    path = root / "conf" / "study" / f"{preset}.yaml"
    raw = OmegaConf.to_container(OmegaConf.load(path))
    what = f"keys of conf/study/{path.name}"
    study = keys.read(StudySettings, raw, root, what=what, extra=PRESET_KEYS)
    quick = raw.get("quick", {}) if flags.get("quick") else {}
    study |= keys.read(StudySettings, quick, root, what=f"quick {what}", extra=PRESET_KEYS[:2])
    if "trials" not in study:
        raise ConfigError(f"conf/study/{path.name} lacks the key trials")
    report = report_settings(
        root,
        {**raw.get("report", {}), **quick.get("report", {}), **keys.given(args, ReportSettings)},
        overrides=[*raw.get("overrides", []), *quick.get("overrides", []), *args.overrides],
        command=command,
        smoke=bool(flags.get("quick")),
    )
    parts = _parts(raw.get("parts") or {"main": {"label": ""}}, report, root)
    for column, names in study.get("columns", {}).items():
        missing = sorted(set(names) - {part.name for part in parts})
        if missing:
            keys.fail(f"columns.{column}", list(names), f"names of parts (unknown: {missing})")
    return StudySettings(report=report, parts=parts, **{**study, **flags})


def _parts(raw: Mapping[str, Any], report: ReportSettings, root: Path) -> tuple[Part, ...]:
    """The parts of a preset, checked like the report's own settings."""
    parts = []
    for name, values in raw.items():
        part = keys.read(Part, values, root, prefix=f"parts.{name}.", what=f"keys of parts.{name}")
        compared = part.get("optimizers") or report.optimizers
        per_optimizer = sorted(part.get("optimizer_overrides", {}))
        if set(per_optimizer) - set(compared):
            allowed = f"optimizers it compares {list(compared)}"
            keys.fail(f"parts.{name}.optimizer_overrides", per_optimizer, allowed)
        part["label"] = name if part.get("label") is None else part["label"]
        parts.append(Part(name=name, **part))
    return tuple(parts)
