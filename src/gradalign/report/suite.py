"""The summary of a workload suite: does a challenger's effect against the baseline generalise
across workloads? One part of the study per workload (an ``experiment=`` preset), each a report
of its own; this page puts their primary outcomes side by side.

Per workload and challenger: the paired difference (challenger - baseline) of the primary
outcome over the final seeds with its (1 - alpha) t-interval, the paired t-test's p, and that p
corrected for multiplicity by Holm's method over every (workload, challenger) comparison of the
suite (stats.holm). Its result is the paired test's verdict (stats.judge) on the Holm-corrected
p in the suite's words: a *win* or a *loss* when p < alpha, in the better or the worse direction
of the outcome, a *tie* otherwise, *untested* when the seeds admit no test, a *smoke run* (no
verdict) in a quick suite or with fewer seeds than ``min_pairs``. The forest plot shows each
difference as a percentage of the baseline's mean, so that workloads whose losses differ in
scale share one axis; the interval is scaled by the same
constant, so it excludes 0 exactly when the unadjusted p < alpha.

Written to ``<outputs>/report/<name>/suite.md`` (and ``suite_forest.png``), and logged to the
study's MLflow run (gradalign.report.summary). Nothing here names a workload: a new one is a
preset (conf/experiment/) and a part of the suite's study preset.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure
from omegaconf import OmegaConf

from gradalign.report.build import Report
from gradalign.report.markdown import table
from gradalign.report.settings import ReportSettings, StudySettings
from gradalign.report.stats import (
    PER_SEED_OUTCOMES,
    TEST,
    PairedTest,
    Verdict,
    detectable_effect,
    format_p,
    holm,
    judge,
    mean_std,
    smoke_reason,
)
from gradalign.report.summary import provenance, summary_run
from gradalign.schema import Metric, Tag

log = logging.getLogger(__name__)
MARKDOWN, FIGURE = "suite.md", "suite_forest.png"
# The suite's word for each verdict, and the order its tables count them in.
WORDS = {
    Verdict.BETTER: "win",
    Verdict.NO_DIFFERENCE: "tie",
    Verdict.WORSE: "loss",
    Verdict.UNTESTABLE: "untested",
    Verdict.SMOKE: "smoke run",
}
RESULTS = tuple(WORDS.values())
PLURALS = {"win": "wins", "tie": "ties", "loss": "losses", "smoke run": "smoke runs"}
SMOKE = WORDS[Verdict.SMOKE]


@dataclasses.dataclass(frozen=True)
class Effect:
    """One challenger against the baseline on one workload, on the primary outcome."""

    workload: str
    optimizer: str
    test: PairedTest
    baseline_mean: float
    p_holm: float
    result: str  # one of RESULTS

    @property
    def relative(self) -> tuple[float, float, float]:
        """(difference, CI low, CI high) in percent of the baseline's mean."""
        scale = 100 / abs(self.baseline_mean) if self.baseline_mean else math.nan
        return tuple(scale * v for v in (self.test.mean_diff, *self.test.ci))


def effects(reports: Mapping[str, Report], settings: ReportSettings) -> list[Effect]:
    """Every (workload, challenger) comparison of the suite on the primary outcome, judged on
    its p Holm-corrected over the family of the suite's tested comparisons (smoke runs are
    not tested, so not counted)."""
    primary, alpha = settings.primary, settings.alpha
    better = PER_SEED_OUTCOMES[primary].higher_is_better
    judged = functools.partial(
        judge, alpha=alpha, higher_is_better=better, min_pairs=settings.min_pairs,
        smoke=settings.smoke)  # fmt: skip
    rows = []
    for workload, report in reports.items():
        base = [r.outcomes[primary] for r in report.finals if r.optimizer == settings.baseline]
        for comparison in report.comparisons:
            rows.append((workload, comparison.optimizer, comparison.tests[primary], base))
    tested = [math.nan if judged(test) is Verdict.SMOKE else test.p for _, _, test, _ in rows]
    return [
        Effect(w, o, test, mean_std(base).mean, p, WORDS[judged(test, p=p)])
        for (w, o, test, base), p in zip(rows, holm(tested), strict=True)
    ]


def tally(found: Sequence[Effect]) -> dict[str, dict[str, int]]:
    """Per challenger, how many workloads are each of RESULTS."""
    table: dict[str, dict[str, int]] = {}
    for effect in found:
        table.setdefault(effect.optimizer, dict.fromkeys(RESULTS, 0))[effect.result] += 1
    return table


def _which(found: Sequence[Effect], optimizer: str, result: str) -> str:
    """The workloads behind a count of wins or losses, in parentheses; nothing for ties."""
    if result not in ("win", "loss"):
        return ""
    named = [e.workload for e in found if e.optimizer == optimizer and e.result == result]
    return f" ({', '.join(named)})" if named else ""


def plot_forest(found: Sequence[Effect], path: Path, primary: str, level: str) -> None:
    """One row per (workload, challenger): the difference in % of the baseline's mean with its
    interval; a line at no difference."""
    optimizers = list(dict.fromkeys(e.optimizer for e in found))
    colors = {o: f"C{i}" for i, o in enumerate(optimizers)}
    fig = Figure(figsize=(7, 1.2 + 0.42 * len(found)), layout="constrained")
    ax = fig.subplots()
    for row, effect in enumerate(reversed(found)):
        mid, low, high = effect.relative
        ax.errorbar([mid], [row], xerr=[[mid - low], [high - mid]], fmt="o", capsize=3,
                    color=colors[effect.optimizer])  # fmt: skip
    ax.set_yticks(range(len(found)), [f"{e.workload}: {e.optimizer}" for e in reversed(found)])
    ax.axvline(0, color="black", linewidth=0.8)
    for optimizer in optimizers:
        ax.plot([], [], "o", color=colors[optimizer], label=optimizer)
    ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(
        f"{PER_SEED_OUTCOMES[primary].label}: difference to the baseline, % of its mean ({level})"
    )
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=90)


def _mean_sd(values: Sequence[float], scale: float = 1.0, digits: int = 4) -> str:
    s = mean_std(values)
    if s.n == 0:
        return "n/a"
    sd = "" if math.isnan(s.std) else f" ± {scale * s.std:.{digits}f}"
    return f"{scale * s.mean:.{digits}f}{sd}"


def _reference(cfg_reference: Mapping[str, object]) -> str:
    if "test_acc" not in cfg_reference:
        return "none"
    return f"{100 * float(cfg_reference['test_acc']):.0f}% ({cfg_reference.get('source', '?')})"


def verdict_lines(found: Sequence[Effect], baseline: str) -> list[str]:
    """The suite's verdict on each challenger: its results counted (untested and smoke runs
    only when there are some), the workloads of its wins and losses named."""
    lines = []
    for optimizer, count in tally(found).items():
        counted = ", ".join(
            f"{count[r]} {r if count[r] == 1 else PLURALS.get(r, r)}{_which(found, optimizer, r)}"
            for r in RESULTS
            if count[r] or r not in ("untested", SMOKE)
        )
        if count[SMOKE] == sum(count.values()):
            counted = "smoke run, numbers only, no verdict"
        lines.append(
            f"- **{optimizer}** against {baseline} over {sum(count.values())} workloads: {counted}."
        )
    return lines


def render(
    settings: StudySettings,
    name: str,
    parts: Mapping[str, ReportSettings],
    reports: Mapping[str, Report],
    found: Sequence[Effect],
    run_id: str,
) -> str:
    """suite.md: the verdict, the tuned baseline per workload, the effects, the win/tie/loss
    table, the figure, each workload's own paired verdict, and how sure the data allow us to be;
    for a smoke run (every comparison one) its numbers, labelled, with no verdict."""
    report = settings.report
    labels = {part.name: part.label for part in settings.parts}
    primary, alpha, baseline = report.primary, report.alpha, report.baseline
    label = PER_SEED_OUTCOMES[primary].label
    level = f"{1 - alpha:.0%} CI"
    counts = tally(found)
    smoke = all(e.result == SMOKE for e in found)
    seeds = max(len(s.seeds) for s in parts.values())
    lines = [
        f"# Workload suite `{name}`{' (SMOKE RUN)' if smoke else ''}: "
        f"{', '.join(counts)} against {baseline}",
        "",
        *provenance(
            settings,
            run_id,
            "the workloads' reports",
            f"; primary outcome {label}, alpha = {alpha:g}, Holm-corrected over "
            f"{sum(not math.isnan(e.p_holm) for e in found)} comparisons",
        ),
        "",
    ]
    if smoke:
        lines += [
            "## SMOKE RUN: no verdict",
            "",
            f"This suite is a smoke run ({smoke_reason(seeds, report.min_pairs, report.smoke)}): "
            "the numbers below show that the pipeline ran, not how the optimizers compare.",
            "",
            *verdict_lines(found, baseline),
        ]
    else:
        lines += [
            "## Verdict",
            "",
            *verdict_lines(found, baseline),
            f"- How sure: a win or a loss is a {TEST} on {seeds} seeds whose p, Holm-corrected "
            f"over the whole suite, is below {alpha:g}; the family-wise error rate is at most "
            f"{alpha:g}. With {seeds} seeds one test has 80% power only for |d_z| >= "
            f"{detectable_effect(seeds, alpha):.2f} before the correction, so a tie is not "
            "evidence of no effect; the intervals below say how large an effect the data still "
            "allow.",
        ]
    lines += ["", f"## {baseline}, tuned, on each workload", ""]
    rows = []
    for workload, r in reports.items():
        cfg = r.plan.compositions[baseline].cfg
        runs = [f for f in r.finals if f.optimizer == baseline]
        reference = OmegaConf.to_container(cfg.reference, resolve=True) if cfg.reference else {}
        rows.append(
            [
                f"{workload} ({labels[workload]})" if labels[workload] != workload else workload,
                f"{cfg.dataset.name} / {cfg.model.name}",
                r.plan.final_epochs,
                ", ".join(
                    f"{k.split('.', 1)[1]}={float(v):.3g}"
                    for k, v in r.hyperparameters[baseline].items()
                ),  # fmt: skip
                _mean_sd([f.outcomes["best_val_loss"] for f in runs]),
                _mean_sd([f.outcomes["best_val_loss"] for f in runs], 1 / math.log(2), 3),
                _mean_sd([f.outcomes["test_acc_at_best"] for f in runs], 100, 1) + "%",
                _reference(reference),
            ]
        )
    header = ["workload", "data / model", "epochs", "tuned", "min val loss (nats)", "(bits)",
              "test acc at min val loss", "published"]  # fmt: skip
    lines += table(header, rows)
    lines += [
        "",
        "Bits = nats / ln 2: for a character language model, bits per character.",
        "",
        f"## Effects on {label} (optimizer - {baseline})",
        "",
    ]
    rows = []
    for e in found:
        rel = e.relative
        tested = e.result != SMOKE  # a smoke run's test statistics are not shown
        rows.append(
            [
                e.workload,
                e.optimizer,
                f"{e.test.mean_diff:+.4g} [{e.test.ci[0]:+.4g}, {e.test.ci[1]:+.4g}]",
                f"{rel[0]:+.2f}% [{rel[1]:+.2f}, {rel[2]:+.2f}]",
                *(
                    (f"{e.test.d_z:+.2f}", format_p(e.test.p, alpha), format_p(e.p_holm, alpha))
                    if tested
                    else ("—", "—", "—")
                ),
                str(e.test.n),
                e.result,
            ]
        )
    header = ["workload", "optimizer", f"difference ({level})", f"% of {baseline} ({level})",
              "d_z", f"p ({TEST})", "p (Holm)", "seeds", "result"]  # fmt: skip
    lines += table(header, rows)
    if not smoke:
        shown = [r for r in RESULTS if r != SMOKE or any(c[r] for c in counts.values())]
        lines += ["", "## Wins, ties and losses", ""]
        lines += table(["optimizer", *shown],
                        [[o, *(str(c[r]) for r in shown)] for o, c in counts.items()])  # fmt: skip
    lines += [
        "",
        f"## Figure: {label}, difference to {baseline} ({level}, unadjusted)",
        "",
        f"![forest plot of the effects]({FIGURE})",
        "",
        "## Each workload's own numbers"
        if smoke
        else "## Each workload's own verdict (uncorrected)",
        "",
    ]
    own = {part.name: part.overrides for part in settings.parts}
    for workload, r in reports.items():
        lines.append(f"- **{workload}** (`{r.out_dir.name}/report.md`, "
                     + " ".join(f"`{o}`" for o in own[workload]) + "):")  # fmt: skip
        lines += [f"  - {c.sentence}" for c in r.comparisons]
    return "\n".join(lines) + "\n"


def write_suite(settings: StudySettings, name: str, parts: Mapping[str, ReportSettings]) -> Path:
    """Write every workload's report, then the suite page; the page. Its verdict lines go to
    the log and the study run's description too, so every view says the same."""
    report = settings.report
    with summary_run(settings, name, parts, "suite") as summary:
        found = effects(summary.reports, report)
        level = f"{1 - report.alpha:.0%} CI"
        plot_forest(found, summary.folder / FIGURE, report.primary, level)
        text = render(settings, name, parts, summary.reports, found, summary.run.run_id)
        (summary.folder / MARKDOWN).write_text(text)
        values = {}
        for e in found:
            stats = {
                "mean_diff": e.test.mean_diff,
                "ci_low": e.test.ci[0],
                "ci_high": e.test.ci[1],
                "relative_diff": e.relative[0],
            }
            if e.result != SMOKE:
                stats |= {"d_z": e.test.d_z, Metric.DECIDING_P: e.test.p, "p_holm": e.p_holm}
            values |= {f"{e.workload}/{e.optimizer}/{k}": v for k, v in stats.items()}
        smoke = all(e.result == SMOKE for e in found)
        for optimizer, count in tally(found).items():
            if not smoke:
                values |= {f"{optimizer}/{r.replace(' ', '_')}": n for r, n in count.items()}
        verdicts = {f"{Tag.VERDICT_PREFIX}{e.workload}/{e.optimizer}": e.result for e in found}
        lines = verdict_lines(found, report.baseline)
        summary.finish(values, verdicts, lines, smoke)
    return summary.folder / MARKDOWN
