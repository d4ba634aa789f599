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

Each check says what holds in plain words: "holds" (significant, paired t-test, in the claimed
direction; or the same difference on every seed), "contradicted" (the same, the other way),
"not shown" (no significant difference; with few seeds only large effects can be detected),
"partly" (a lower val loss in significantly more than half the epochs, not in all) or, with one
seed, the two runs' values alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from gradalign.report.finals import FinalResult
from gradalign.report.stats import PairedTest, paired_test
from gradalign.schema import Metric


@dataclasses.dataclass(frozen=True)
class Claim:
    """A claim: its words, the per-seed quantity that tests it, and which direction supports it
    (``lower``: the challenger's value should be below the baseline's)."""

    key: str
    words: str
    quantity: str
    lower: bool


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
) -> Check:
    """``claim`` for the challenger's final runs against the baseline's of the same seeds."""
    by_seed = {run.seed: run for run in baseline}
    pairs = [(run, by_seed[run.seed]) for run in challenger if run.seed in by_seed]
    ours = [per_seed(claim, run, other) for run, other in pairs]
    theirs = (
        [0.5] * len(pairs)
        if claim.key == "throughout"
        else [per_seed(claim, other, run) for run, other in pairs]
    )
    test = paired_test(theirs, ours, alpha)
    verdict = _verdict(claim, ours, test, alpha)
    return Check(claim, ours, theirs, test, verdict, _text(claim, ours, theirs, test, verdict))


def _verdict(claim: Claim, values: Sequence[float], test: PairedTest, alpha: float) -> str:
    if claim.key == "throughout" and values and all(v == 1.0 for v in values):
        return "holds"
    if test.n < 2:
        return "one seed" if test.n == 1 else "not testable"
    if math.isnan(test.p_t):  # every seed differs by exactly the same amount: no variance
        if test.mean_diff == 0:
            return "no difference"
    elif test.p_t >= alpha:
        return "not shown"
    supports = (test.mean_diff < 0) == claim.lower
    if claim.key == "throughout":  # significantly above half the epochs is not "throughout"
        return "partly" if supports else "contradicted"
    return "holds" if supports else "contradicted"


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
    if test.n < 2 or math.isnan(test.p_t):
        return f"{verdict}: {summary}"
    low, high = (scale * bound for bound in test.ci)
    return (
        f"{verdict}: {summary}; diff {scale * test.mean_diff:+.3g}{unit} "
        f"[{low:+.3g}, {high:+.3g}], p = {test.p_t:.2g}, d_z = {test.d_z:+.2f}, n = {test.n}"
    )
