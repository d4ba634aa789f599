"""The summary of a study of several comparisons (an audit): every part's report, then one page
that puts them side by side, claim by claim (gradalign.report.claims), with the tuned values next
to the ones a study being audited published (the experiment's ``reference``), a figure of every
part's validation curves, and the verdicts in plain words.

It is written to ``<outputs>/report/<name>/audit.md`` (and ``audit_curves.png``), and logged to
the study's MLflow run (gradalign.report.summary).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

from matplotlib.figure import Figure
from omegaconf import OmegaConf

from gradalign.report.build import Report
from gradalign.report.claims import CLAIMS, WORDS, Check, check
from gradalign.report.markdown import table
from gradalign.report.plots import panel
from gradalign.report.settings import ReportSettings, StudySettings
from gradalign.report.stats import TEST, Verdict, detectable_effect, smoke_reason
from gradalign.report.summary import provenance, summary_run
from gradalign.schema import Metric, Tag

log = logging.getLogger(__name__)
MARKDOWN, FIGURE = "audit.md", "audit_curves.png"
SMOKE = WORDS[Verdict.SMOKE]


def checks(report: Report, settings: ReportSettings) -> dict[str, Check]:
    """Every claim on one part's final runs."""
    runs = {name: [r for r in report.finals if r.optimizer == name] for name in settings.optimizers}
    (other,) = [name for name in settings.optimizers if name != settings.baseline]
    return {
        claim.key: check(
            claim,
            runs[other],
            runs[settings.baseline],
            settings.alpha,
            min_pairs=settings.min_pairs,
            smoke=settings.smoke,
        )  # fmt: skip
        for claim in CLAIMS
    }


def write_audit(settings: StudySettings, name: str, parts: Mapping[str, ReportSettings]) -> Path:
    """Write every part's report, then the audit page; the page. Its plain-words lines go to
    the log and the study run's description too, so every view says the same."""
    with summary_run(settings, name, parts, "audit") as summary:
        reports, folder, run = summary.reports, summary.folder, summary.run
        found = {part: checks(reports[part], parts[part]) for part in parts}
        plot_parts(reports, parts, folder / FIGURE)
        cfg = summary.cfg
        reference = OmegaConf.to_container(cfg.reference, resolve=True) if cfg.reference else {}
        text = render(settings, name, parts, reports, found, reference, run.run_id)
        (folder / MARKDOWN).write_text(text)
        values = {}
        for part, per_claim in found.items():
            for key, c in per_claim.items():
                stats = {"mean_diff": c.test.mean_diff}
                if c.verdict != SMOKE:
                    stats |= {Metric.DECIDING_P: c.test.p, "d_z": c.test.d_z}
                values |= {f"{part}/{key}/{stat}": value for stat, value in stats.items()}
        verdicts = {
            f"{Tag.VERDICT_PREFIX}{part}/{key}": c.verdict
            for part, per in found.items()
            for key, c in per.items()
        }
        summary.finish(values, verdicts, plain_words(found), smoke=_all_smoke(found))
    return folder / MARKDOWN


def _all_smoke(found: Mapping[str, Mapping[str, Check]]) -> bool:
    return all(c.verdict == SMOKE for per in found.values() for c in per.values())


def plain_words(found: Mapping[str, Mapping[str, Check]]) -> list[str]:
    """Per claim, in how many parts it holds and where it is contradicted; parts that are
    smoke runs are named, and judge nothing."""
    lines = []
    for claim in CLAIMS:
        verdicts = {p: per[claim.key].verdict for p, per in found.items()}
        judged = {p: v for p, v in verdicts.items() if v != SMOKE}
        smoke = [p for p in verdicts if p not in judged]
        if not judged:
            lines.append(f"- **{claim.words}**: smoke run in every part, no verdict.")
            continue
        held = [p for p, v in judged.items() if v == "holds"]
        against = [p for p, v in judged.items() if v == "contradicted"]
        lines.append(
            f"- **{claim.words}**: holds in {len(held)} of {len(judged)} parts"
            + (f" ({', '.join(held)})" if held else "")
            + (f"; contradicted in {', '.join(against)}" if against else "")
            + (f"; smoke run (no verdict) in {', '.join(smoke)}" if smoke else "")
            + "."
        )
    return lines


def plot_parts(
    reports: Mapping[str, Report], parts: Mapping[str, ReportSettings], path: Path
) -> None:
    """One panel per part: each optimizer's validation loss (log axis), mean over seeds with
    the 95% band of the mean (in log space)."""
    columns = min(4, len(reports))
    rows = math.ceil(len(reports) / columns)
    fig = Figure(figsize=(4.2 * columns, 3.3 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for ax, (part, report) in zip(axes, reports.items(), strict=False):
        runs = {
            optimizer: [r.curves for r in report.finals if r.optimizer == optimizer]
            for optimizer in parts[part].optimizers
        }
        title = f"{part}: {len(parts[part].seeds)} seed(s)"
        panel(ax, runs, Metric.VAL_LOSS, title, log=True)
    for ax in axes[len(reports) :]:
        ax.set_visible(False)
    fig.suptitle("validation loss of the final runs, per part of the audit")
    fig.savefig(path, dpi=90)


def _tuned(report: Report) -> str:
    return "; ".join(
        f"{optimizer} "
        + ", ".join(f"{k.split('.', 1)[1]}={float(v):.3g}" for k, v in values.items())
        for optimizer, values in report.hyperparameters.items()
    )


def _quoted(reference: Mapping[str, object]) -> list[str]:
    """Lines quoting what the audited study published (its config's ``reference``)."""
    if not reference:
        return []
    tuned = "; ".join(
        f"{optimizer} " + ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in values.items())
        for optimizer, values in reference.items()
        if isinstance(values, Mapping)
    )
    lines = [f"Published by {reference.get('source', 'the audited study')}: tuned {tuned}."]
    lines += [f"> - {claim}" for claim in reference.get("claims", [])]
    return [*lines, ""]


def render(
    settings: StudySettings,
    name: str,
    parts: Mapping[str, ReportSettings],
    reports: Mapping[str, Report],
    found: Mapping[str, Mapping[str, Check]],
    reference: Mapping[str, object],
    run_id: str,
) -> str:
    """audit.md: the claims table first, then the tuned values, the verdicts in words, the
    figure, what each part is, and how sure the data allow us to be."""
    labels = {part.name: part.label for part in settings.parts}
    columns = settings.columns or {part: (part,) for part in parts}
    smoke = _all_smoke(found)
    n = max(len(s.seeds) for s in parts.values())
    alpha, min_pairs = settings.report.alpha, settings.report.min_pairs
    legend = (
        f"Every cell is a smoke run ({smoke_reason(n, min_pairs, settings.report.smoke)}): the "
        "challenger's mean against the baseline's and the paired difference with its 95% CI, "
        "numbers that judge no claim."
        if smoke
        else "Each cell: the verdict (holds / contradicted / not shown / partly / one seed / "
        "smoke run), the challenger's mean against the baseline's, the paired difference with "
        f"its 95% CI, the {TEST}'s p, Cohen's d_z and the number of seeds."
    )
    lines = [
        f"# Audit `{name}`{' (SMOKE RUN)' if smoke else ''}: the claims, part by part",
        "",
        *provenance(settings, run_id, "the parts' reports"),
        "",
        "## The claims",
        "",
        *_quoted(reference),
        legend,
        "",
    ]
    header = ["claim (quantity per seed)", *columns]
    rows = [
        [
            "tuned values",
            *["<br>".join(f"{p}: {_tuned(reports[p])}" for p in ps) for ps in columns.values()],
        ]
    ]
    for claim in CLAIMS:
        cells = []
        for ps in columns.values():
            per = [found[p][claim.key] for p in ps]
            cells.append(
                "<br>".join(
                    (f"{p}: " if len(ps) > 1 else "") + c.text for p, c in zip(ps, per, strict=True)
                )
            )
        rows.append([f"{claim.words} ({claim.quantity})", *cells])
    lines += table(header, rows)
    lines += ["", "## SMOKE RUN: no verdict" if smoke else "## In plain words", ""]
    lines += plain_words(found)
    on_test = [  # parts whose runs validated, and so selected, on the test split
        p
        for p, r in reports.items()
        if OmegaConf.select(r.plan.compositions[parts[p].baseline].cfg, "dataset.validation")
        == "test"
    ]
    if on_test:
        lines.append(
            f"- In parts {', '.join(on_test)} the validation set is the mnist1d test split (the "
            "note's protocol): the selected hyperparameters and the epoch of the minimum were "
            "chosen on test data, so their test accuracy is not an unbiased estimate. Part (d) "
            "carves validation from train and reports test only."
        )
    if not smoke:
        lines.append(
            f"- With {n} seeds a two-sided {TEST} at alpha = {alpha:g} has 80% power only "
            f'for effects |d_z| >= {detectable_effect(n, alpha):.2f}: "not shown" is not '
            "evidence of no effect. A single seed (the replica) admits no test at all."
        )
    lines += [
        "",
        "## Figure",
        "",
        f"![validation loss per part]({FIGURE})",
        "",
        "## The parts",
        "",
    ]
    for part, report in reports.items():
        s = parts[part]
        lines.append(
            f"- **{part}** {labels[part]}: {' vs '.join(s.optimizers)}, seeds "
            f"{list(s.seeds)}, overrides {' '.join(f'`{o}`' for o in s.overrides) or 'none'}"
            + "".join(
                f", {o}: {' '.join(f'`{x}`' for x in v)}" for o, v in s.optimizer_overrides.items()
            )
            + f"; report `{report.out_dir.name}/report.md`"
        )
    return "\n".join(lines) + "\n"
