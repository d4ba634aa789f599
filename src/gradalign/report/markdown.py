"""report.md: the verdict first, then how it was reached: the selected hyperparameters, the
outcomes over seeds, the paired tests, every per-seed value, and the caveats of a small n. A
smoke run (stats.Verdict.SMOKE) shows the same numbers under that label, without a verdict or
the test statistics that would read as one."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from gradalign.report.finals import FinalResult
from gradalign.report.plots import BAND
from gradalign.report.runs import TRIAL_KINDS, SweepChoice
from gradalign.report.settings import ReportSettings
from gradalign.report.stats import (
    COLUMNS,
    PER_SEED_OUTCOMES,
    TEST,
    TESTED,
    Comparison,
    MeanStd,
    Verdict,
    detectable_effect,
    format_p,
    is_smoke,
    min_wilcoxon_p,
    smoke_reason,
)

ACCURACY = ("test_acc_at_best", "final_test_acc")


def _value(outcome: str, x: float) -> str:
    if not math.isfinite(x):
        return "—"
    if outcome in ACCURACY:
        return f"{100 * x:.2f}%"
    return f"{x:.1f}" if outcome == "best_epoch" else f"{x:.4f}"


def _summary(outcome: str, s: MeanStd, n_total: int) -> str:
    text = f"{_value(outcome, s.mean)} ± {_value(outcome, s.std)}"
    return text if s.n == n_total else f"{text} (n={s.n})"


def _number(x: float, spec: str = ".3g") -> str:
    return "—" if not math.isfinite(x) else format(x, spec)


def _statistic(key: str, x: float, alpha: float) -> str:
    """A paired test's statistic ``key`` for the table; p values by ``format_p``."""
    return format_p(x, alpha) if key.startswith("p_") and math.isfinite(x) else _number(x)


def _param(value: str) -> str:
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render(
    *,
    settings: ReportSettings,
    header: Mapping[str, str],
    choices: Mapping[str, SweepChoice],
    hyperparameters: Mapping[str, Mapping[str, str]],
    finals: Sequence[FinalResult],
    final_epochs: str,
    summaries: Mapping[str, Mapping[str, MeanStd]],
    comparisons: Sequence[Comparison],
    figure: str,
) -> str:
    """The markdown of the report.

    ``header``: title and provenance lines (label -> value); ``hyperparameters``: per optimizer,
    the best run's searched params (configs.hyperparameters); ``summaries``: optimizer ->
    outcome -> MeanStd.
    """
    n = len(settings.seeds)
    primary = PER_SEED_OUTCOMES[settings.primary].label
    smoke = is_smoke(comparisons)
    lines = [f"# {header['title']}", ""]
    lines += [f"- {label}: {value}" for label, value in header.items() if label != "title"]

    heading = (
        "SMOKE RUN: no verdict"
        if smoke
        else f"Verdict (primary outcome: {primary}, {TEST}, alpha = {settings.alpha:g})"
    )
    lines += ["", f"## {heading}", ""]
    lines += [f"- {c.sentence}" for c in comparisons]
    shared = sorted({s for c in choices.values() for s in c.seeds} & set(settings.seeds))
    if shared:
        lines += [
            "",
            f"**Caution:** seed(s) {shared} also ran the sweeps, so the hyperparameters were "
            "picked on those seeds' first epochs and their final runs favour the picked "
            "configurations. "
            "Use final seeds disjoint from the sweeps' (--seeds).",
        ]
    floor = min_wilcoxon_p(n)
    lines += [
        "",
        f"This report is a smoke run ({smoke_reason(n, settings.min_pairs, settings.smoke)}): "
        "its numbers show that the pipeline ran, not how the optimizers compare; its tables "
        "leave out the test statistics."
        if smoke
        else f"With n = {n} seeds, a two-sided {TEST} at alpha = {settings.alpha:g} has 80% "
        f"power only for effects |d_z| >= {detectable_effect(n, settings.alpha):.2f}: a smaller "
        'true difference is likely to be missed, so "no significant difference" is not '
        "evidence of equality. The exact Wilcoxon signed-rank test cannot give p below 2/2^n = "
        f"{floor:.4g}"
        + (" with this n, so it cannot reach significance." if floor >= settings.alpha else "."),
    ]

    lines += ["", "## Selected hyperparameters (best sweep run per optimizer)", ""]
    budgets = {choice.budget for choice in choices.values()}
    lines.append(
        f"Each optimizer's best `{settings.metric}` ({settings.direction}) run of one sweep, "
        "made with this report's settings: the sweep given by `--sweeps` (or by the study), "
        "else its latest complete one; the runs of several sweeps are never pooled. A trial "
        "counts by the outcome its Optuna study records (by its MLflow run where the study was "
        "not stored); only complete ones are candidates. Tuning budget: the trials a sweep "
        "counts towards its `n_trials` (complete, diverged, pruned), and its pruner. "
        + (
            f"Every optimizer was tuned with the same budget, {next(iter(budgets))}."
            if len(budgets) == 1
            else "**The budgets are UNEQUAL** (compared by `--unequal-budgets`): the "
            "optimizer with more trials had more chances to find a good configuration."
        )
    )
    lines.append("")
    rows = []
    for name, choice in choices.items():
        params = ", ".join(
            f"{k.split('.', 1)[1]}={_param(v)}" for k, v in hyperparameters[name].items()
        )
        rows.append(
            [
                name,
                params or "(config defaults)",
                f"{choice.value:.4f}",
                f"`{choice.run_id}`",
                f"`{choice.sweep_id}`",
                str(choice.budget),
                *(str(choice.counts[kind]) for kind in TRIAL_KINDS),
                choice.outcomes_from,
                str(len(choice.other_sweeps)),
                str(choice.other_settings),
            ]
        )
    lines += table(
        [
            "optimizer",
            "hyperparameters",
            settings.metric,
            "run",
            "sweep",
            "tuning budget",
            *TRIAL_KINDS,
            "outcomes from",
            "other sweeps (not used)",
            "other settings (ignored)",
        ],
        rows,
    )

    lines += [
        "",
        f"## Final runs: {final_epochs} epochs, seeds {list(settings.seeds)} "
        "(mean ± std over seeds)",
        "",
    ]
    rows = []
    for name in choices:
        diverged = sum(r.diverged for r in finals if r.optimizer == name)
        rows.append(
            [name, *(_summary(o, summaries[name][o], n) for o in PER_SEED_OUTCOMES), str(diverged)]
        )
    labels = [outcome.label for outcome in PER_SEED_OUTCOMES.values()]
    lines += table(["optimizer", *labels, "diverged"], rows)

    lines += [
        "",
        f"## Paired tests against {settings.baseline} "
        f"(difference = optimizer - {settings.baseline})",
        "",
    ]
    rows = []
    for c in comparisons:
        tested = c.verdict is not Verdict.SMOKE  # a smoke run's test statistics are not shown
        for outcome in TESTED:
            t = c.tests[outcome]
            marker = " (primary)" if outcome == settings.primary else ""
            rows.append(
                [
                    c.optimizer,
                    PER_SEED_OUTCOMES[outcome].label + marker,
                    str(t.n),
                    _number(t.mean_diff, "+.4g"),
                    f"[{_number(t.ci[0], '+.4g')}, {_number(t.ci[1], '+.4g')}]"
                    if math.isfinite(t.ci[0])
                    else "—",
                    *(
                        _statistic(key, getattr(t, key), settings.alpha) if tested else "—"
                        for key, _ in COLUMNS
                    ),
                ]
            )
    level = f"{1 - settings.alpha:.0%} CI"
    lines += table(
        ["optimizer", "outcome", "n", "mean diff", level, *(header for _, header in COLUMNS)], rows
    )
    lines += [
        "",
        "Smoke run: these numbers decide nothing. Lower loss and higher accuracy are better."
        if smoke
        else "Only the primary outcome decides the verdict; the other rows are descriptive and "
        "not corrected for multiple comparisons. Lower loss and higher accuracy are better.",
    ]

    lines += ["", "## Figure", "", f"![convergence comparison]({figure})", ""]
    lines.append(
        f"Mean over seeds, band: {BAND}. Bottom right: GAO's mean alignment scale per parameter "
        "tensor (thin) and over tensors (thick)."
    )

    lines += ["", "## Per-seed values", ""]
    rows = [
        [
            r.optimizer,
            str(r.seed),
            f"`{r.run_id}`",
            "reused" if r.reused else "trained",
            *(_value(o, r.outcomes[o]) for o in PER_SEED_OUTCOMES),
        ]
        for r in finals
    ]
    lines += table(["optimizer", "seed", "run", "", *labels], rows)
    lines += [
        "",
        "For each seed s every optimizer ran with seed.model = seed.data = s: identical initial "
        "weights (checked: equal `init_hash` tags, a hash of the initial state_dict) and "
        "mini-batch order.",
        "",
    ]
    return "\n".join(lines)
