"""A research note's claims about a challenger optimizer, checked on one comparison's final runs.

The claims are the ones the research note makes for GAO against Adam, each turned into a number
per seed (runs of the same seed share initial weights and data order, so they pair):

- its tuned values;
- "a lower validation loss than Adam throughout the training run": the fraction of epochs in
  which the challenger's validation loss is below the baseline's; it holds only at 100%;
- "more stable": the rise of the validation loss from its minimum to the last epoch (how much a
  run overfits), lower is better;
- "maintains a better validation score": the minimum validation loss, lower is better;
- and, as what a user keeps: the test accuracy at the epoch of that minimum, higher is better.

Each check says what holds in words derived from the paired test's verdict (stats.judge):
"holds" (better in the claimed direction), "contradicted" (the other way), "not shown" (no
significant difference; with few seeds only large effects can be detected), "partly" (a lower
val loss in significantly more than half the epochs, not in all), "not testable" or, with one
seed, "one seed" and the two runs' values alone; "smoke run" (a quick study, or too few seeds)
shows the numbers without a verdict. "Throughout" holds without a test when every epoch of
every seed is lower: that is the claim's own definition.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from gradalign.report.finals import FinalResult
from gradalign.report.stats import PairedTest, Verdict, format_p, judge, paired_test
from gradalign.schema import Metric


@dataclasses.dataclass(frozen=True)
class Claim:
    """A claim: its words, the per-seed quantity that tests it, and which direction supports it
    (``lower``: the challenger's value should be below the baseline's)."""

    key: str
    words: str
    quantity: str
    lower: bool


# The claims table's word for each verdict on a claim (better: in the claimed direction).
WORDS = {
    Verdict.BETTER: "holds",
    Verdict.WORSE: "contradicted",
    Verdict.NO_DIFFERENCE: "not shown",
    Verdict.UNTESTABLE: "not testable",
    Verdict.SMOKE: "smoke run",
}
CLAIMS = (
    Claim("throughout", "lower validation loss throughout the run",
          "share of epochs with a lower val loss", lower=False),
    Claim("stable", "more stable", "rise of val loss from its minimum to the last epoch",
          lower=True),
    Claim("score", "better validation score", "minimum val loss", lower=True),
    Claim("test_acc", "better test accuracy where the val loss is lowest",
          "test accuracy at the epoch of the minimum val loss", lower=False),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Check:
    """One claim checked on one comparison: the challenger's and the baseline's per-seed values
    (for ``throughout`` the baseline's are the 50% of a coin flip), the paired test, the
    verdict word and a cell of text that says it with its numbers."""

    claim: Claim
    challenger: list[float]
    baseline: list[float]
    test: PairedTest
    verdict: str
    text: str


def share_below(challenger: Sequence[float], baseline: Sequence[float]) -> float:
    """The fraction of the epochs both runs completed in which ``challenger`` is below."""
    n = min(len(challenger), len(baseline))
    if n == 0:
        return math.nan
    return float(np.mean(np.asarray(challenger[:n]) < np.asarray(baseline[:n])))


def per_seed(claim: Claim, run: FinalResult, other: FinalResult) -> float:
    """``claim``'s quantity for ``run`` (``other``: the run it is paired with)."""
    if claim.key == "throughout":
        return share_below(run.curves[Metric.VAL_LOSS], other.curves[Metric.VAL_LOSS])
    if claim.key == "stable":
        return run.outcomes["final_val_loss"] - run.outcomes["best_val_loss"]
    if claim.key == "score":
        return run.outcomes["best_val_loss"]
    return run.outcomes["test_acc_at_best"]


def check(
    claim: Claim,
    challenger: Sequence[FinalResult],
    baseline: Sequence[FinalResult],
    alpha: float,
    *,
    min_pairs: int,
    smoke: bool = False,
) -> Check:
    """``claim`` for the challenger's final runs against the baseline's of the same seeds
    (``min_pairs``, ``smoke``: see stats.judge)."""
    by_seed = {run.seed: run for run in baseline}
    pairs = [(run, by_seed[run.seed]) for run in challenger if run.seed in by_seed]
    ours = [per_seed(claim, run, other) for run, other in pairs]
    theirs = (
        [0.5] * len(pairs)
        if claim.key == "throughout"
        else [per_seed(claim, other, run) for run, other in pairs]
    )
    test = paired_test(theirs, ours, alpha)
    found = judge(test, alpha, not claim.lower, min_pairs=min_pairs, smoke=smoke)
    verdict = _word(claim, ours, test, found)
    return Check(
        claim, ours, theirs, test, verdict, _text(claim, ours, theirs, test, verdict, alpha)
    )


def _word(claim: Claim, values: Sequence[float], test: PairedTest, found: Verdict) -> str:
    """The claims table's word for ``found`` on ``claim``."""
    if found is Verdict.SMOKE:
        return WORDS[found]
    if claim.key == "throughout" and values and all(v == 1.0 for v in values):
        return "holds"
    if found is Verdict.UNTESTABLE and test.n == 1:
        return "one seed"
    if claim.key == "throughout" and found is Verdict.BETTER:
        return "partly"  # significantly above half the epochs is not "throughout"
    return WORDS[found]


def _number(claim: Claim, value: float) -> str:
    if claim.key in ("throughout", "test_acc"):
        return f"{100 * value:.1f}%"
    return f"{value:.4f}"


def _text(
    claim: Claim,
    ours: Sequence[float],
    theirs: Sequence[float],
    test: PairedTest,
    verdict: str,
    alpha: float,
) -> str:
    """The cell of the claims table: the verdict and the numbers behind it."""
    if not ours:
        return "no paired seeds"
    if claim.key == "throughout":
        full = sum(v == 1.0 for v in ours)
        share = _number(claim, float(np.mean(ours)))
        summary = f"{share} of epochs, all of them in {full}/{len(ours)} seeds"
    else:
        summary = (
            f"{_number(claim, float(np.mean(ours)))} vs {_number(claim, float(np.mean(theirs)))}"
        )
    scale = 100 if claim.key in ("throughout", "test_acc") else 1
    unit = " pp" if scale == 100 else ""
    if test.n == 1:
        return f"{verdict}: {summary}; diff {scale * test.mean_diff:+.3g}{unit}, no test (n = 1)"
    if test.n < 2 or math.isnan(test.p):
        return f"{verdict}: {summary}"
    low, high = (scale * bound for bound in test.ci)
    interval = (
        f"{verdict}: {summary}; diff {scale * test.mean_diff:+.3g}{unit} [{low:+.3g}, {high:+.3g}]"
    )
    if verdict == WORDS[Verdict.SMOKE]:  # numbers, but no test statistic to read as a verdict
        return f"{interval}, n = {test.n}"
    return f"{interval}, p = {format_p(test.p, alpha)}, d_z = {test.d_z:+.2f}, n = {test.n}"
