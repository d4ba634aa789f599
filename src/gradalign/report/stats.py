"""Per-seed outcomes of the final runs and the paired statistics the verdict rests on.

Each final run is reduced to a few numbers (min val loss, its epoch, final val loss, test
accuracy); optimizers are compared with the baseline seed by seed, because runs of the same seed
share initial weights and data order: the paired t-test (mean(d) / (sd(d) / sqrt(n)), d = other
minus baseline), the exact Wilcoxon signed-rank test as a check that needs no normality, and
Cohen's d_z = mean(d) / sd(d). The verdict is decided by the paired t-test on one primary
outcome, stated before looking (conf/report.yaml), so that reporting several outcomes does not
become a search for a significant one.

``judge`` is the one verdict over a paired test, in one vocabulary (Verdict); the report's
sentence (``sentence``), the suite's win/tie/loss and the claims table's holds/contradicted are
words for it. A comparison with fewer paired seeds than the report's ``min_pairs``, or any of a
``--quick`` study, is a smoke run: its numbers are shown, never a verdict. Another statistical
test is this module's: ``paired_test`` and the p it gives (``PairedTest.p``), its columns
(``COLUMNS``), and its power (``detectable_effect``).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A per-seed number: its label, and whether higher is better (None: described, not tested)."""

    label: str
    higher_is_better: bool | None


PER_SEED_OUTCOMES: dict[str, Outcome] = {
    "best_val_loss": Outcome("min val loss", False),
    "best_epoch": Outcome("epoch of min val loss", None),
    "final_val_loss": Outcome("final val loss", False),
    "test_acc_at_best": Outcome("test acc at min val loss", True),
    "final_test_acc": Outcome("final test acc", True),
}
TESTED = tuple(
    name for name, outcome in PER_SEED_OUTCOMES.items() if outcome.higher_is_better is not None
)


def outcomes(
    val_loss: Sequence[float], test_acc: Sequence[float], diverged: bool
) -> dict[str, float]:
    """The PER_SEED_OUTCOMES of one run from its per-epoch val loss and test accuracy.

    The minimum is over the completed epochs (the first on ties, epochs 1-based); a diverged run
    has no final values (NaN), and a run without epochs has none at all.
    """
    if not val_loss:
        return dict.fromkeys(PER_SEED_OUTCOMES, math.nan)
    best = int(np.argmin(val_loss))
    return {
        "best_val_loss": float(val_loss[best]),
        "best_epoch": float(best + 1),
        "final_val_loss": math.nan if diverged else float(val_loss[-1]),
        "test_acc_at_best": float(test_acc[best]),
        "final_test_acc": math.nan if diverged else float(test_acc[-1]),
    }


@dataclasses.dataclass(frozen=True)
class MeanStd:
    """Mean and sample standard deviation (ddof=1) of the finite values; n counts them."""

    n: int
    mean: float
    std: float


def mean_std(values: Sequence[float]) -> MeanStd:
    """MeanStd of ``values``, ignoring NaN and inf (a diverged run); std is NaN below 2 values."""
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if finite.size == 0:
        return MeanStd(0, math.nan, math.nan)
    std = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
    return MeanStd(int(finite.size), float(finite.mean()), std)


@dataclasses.dataclass(frozen=True)
class PairedTest:
    """Paired comparison of ``other`` with ``baseline`` over the seeds where both are finite.

    Differences are other minus baseline. ``ci`` is the (1 - alpha) t-interval of their mean.
    Statistics that are undefined (fewer than 2 pairs, or all differences equal) are NaN; one
    pair still has its difference as ``mean_diff``.
    """

    n: int
    mean_diff: float
    sd_diff: float
    ci: tuple[float, float]
    t: float
    p_t: float
    w: float
    p_w: float
    d_z: float

    @property
    def p(self) -> float:
        """The p value the verdict rests on: the paired t-test's (logged as
        schema.Metric.DECIDING_P)."""
        return self.p_t


def format_p(p: float, alpha: float) -> str:
    """``p`` to 3 significant digits, or as many more as keep it on its side of ``alpha``: a
    p of 0.04996 read as "0.05" beside "significant" would contradict its own verdict."""
    for digits in range(3, 17):
        text = f"{p:.{digits}g}"
        if not math.isfinite(p) or (float(text) < alpha) == (p < alpha):
            return text
    return repr(p)


TEST = "paired t-test"  # the test ``PairedTest.p`` comes from, as the pages name it
# The paired tests' columns in report.md: (PairedTest attribute, header); and the statistics
# each comparison logs to MLflow as metrics ``<optimizer>/<outcome>/<attribute>``.
COLUMNS = (("t", "t"), ("p_t", "p (t)"), ("w", "W"), ("p_w", "p (Wilcoxon)"), ("d_z", "d_z"))
LOGGED = ("mean_diff", "p_t", "p_w", "d_z")


def paired_test(baseline: Sequence[float], other: Sequence[float], alpha: float) -> PairedTest:
    """Paired t-test, exact Wilcoxon signed-rank test (two-sided) and Cohen's d_z."""
    if len(baseline) != len(other):
        raise ValueError(f"paired samples differ in length: {len(baseline)} and {len(other)}")
    pairs = [(b, o) for b, o in zip(baseline, other, strict=True) if math.isfinite(b + o)]
    n = len(pairs)
    nan = math.nan
    if n < 2:
        diff = pairs[0][1] - pairs[0][0] if pairs else nan
        return PairedTest(n, diff, nan, (nan, nan), nan, nan, nan, nan, nan)
    base, oth = (np.asarray(side, dtype=float) for side in zip(*pairs, strict=True))
    d = oth - base
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:  # every seed moved by the same amount: no variance to test against
        return PairedTest(n, mean, sd, (mean, mean), nan, nan, nan, nan, nan)
    from scipy import stats  # here, not at the top: report.py --help answers without SciPy

    t_res = stats.ttest_rel(oth, base)
    ci = t_res.confidence_interval(1 - alpha)
    w_res = stats.wilcoxon(oth, base)
    return PairedTest(
        n=n,
        mean_diff=mean,
        sd_diff=sd,
        ci=(float(ci.low), float(ci.high)),
        t=float(t_res.statistic),
        p_t=float(t_res.pvalue),
        w=float(w_res.statistic),
        p_w=float(w_res.pvalue),
        d_z=mean / sd,
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p values, in the order given: with the m finite p values sorted
    ascending, p_(i) becomes max over j <= i of min(1, (m - j + 1) p_(j)). Rejecting where the
    adjusted p < alpha controls the family-wise error rate at alpha under any dependence.

    A NaN p value (an untestable comparison) stays NaN and is not counted in m.
    """
    finite = [i for i, p in enumerate(p_values) if math.isfinite(p)]
    order = sorted(finite, key=lambda i: p_values[i])
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def min_wilcoxon_p(n: int) -> float:
    """Smallest two-sided p-value the exact signed-rank test can give with n untied pairs: 2 / 2**n
    (all differences of one sign). 0.0625 for n = 5: such a test cannot reach p < 0.05."""
    return min(1.0, 2.0 ** (1 - n))


# Gauss-Legendre nodes and weights on (0, 1) for integrals over a chi2 variable's quantiles.
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(256)
_QUANTILES, _QUANTILE_WEIGHTS = (_NODES + 1) / 2, _WEIGHTS / 2


def t_test_power(d_z: float, n: int, alpha: float) -> float:
    """Power of the two-sided paired t-test with n pairs at true effect ``d_z``.

    P(|T| > t_crit) with T = (Z + d_z sqrt(n)) / sqrt(V / (n-1)), V ~ chi2(n-1): the normal
    tail probabilities integrated over V's quantiles (to ~1e-6; scipy's noncentral t returns
    NaN for large noncentralities).
    """
    from scipy import special, stats

    df = n - 1
    critical = stats.t.ppf(1 - alpha / 2, df)
    scaled = critical * np.sqrt(stats.chi2.ppf(_QUANTILES, df) / df)
    shift = d_z * math.sqrt(n)
    tails = special.ndtr(shift - scaled) + special.ndtr(-scaled - shift)
    return float(np.sum(_QUANTILE_WEIGHTS * tails))


def detectable_effect(n: int, alpha: float, power: float = 0.8) -> float:
    """Smallest |d_z| a two-sided paired t-test with n pairs detects with the given power
    (1.68 for n = 5, alpha = 0.05, power 0.8)."""
    if n < 2:
        return math.inf
    from scipy import optimize

    return float(optimize.brentq(lambda d: t_test_power(d, n, alpha) - power, 1e-6, 1e3))


class Verdict(enum.StrEnum):
    """What one paired comparison shows: the vocabulary every view's words derive from."""

    BETTER = "better"  # p < alpha, the difference in the outcome's better direction
    WORSE = "worse"  # p < alpha, the other way
    NO_DIFFERENCE = "no significant difference"  # p >= alpha: not evidence of equality
    UNTESTABLE = "untestable"  # fewer than 2 pairs: no test
    SMOKE = "smoke run"  # a --quick study, or fewer pairs than min_pairs: numbers, no verdict


def judge(
    test: PairedTest,
    alpha: float,
    higher_is_better: bool,
    *,
    min_pairs: int,
    smoke: bool = False,
    p: float | None = None,
) -> Verdict:
    """The verdict on ``test``: ``smoke`` (a quick study) or 2 <= n < ``min_pairs`` is a smoke
    run, n < 2 untestable; then significance is ``p`` (default: ``test.p``; the suite passes a
    Holm-corrected one) < alpha, in the direction of the mean difference. The same difference
    on every seed (no variance, where p is undefined) is the test's limit: that direction, or
    no difference when it is 0."""
    if smoke:
        return Verdict.SMOKE
    if test.n < 2:
        return Verdict.UNTESTABLE
    if test.n < min_pairs:
        return Verdict.SMOKE
    direction = Verdict.BETTER if (test.mean_diff > 0) == higher_is_better else Verdict.WORSE
    if test.sd_diff == 0:  # every seed moved by exactly the same amount: the test's limit
        return Verdict.NO_DIFFERENCE if test.mean_diff == 0 else direction
    p = test.p if p is None else p
    if math.isnan(p):
        return Verdict.UNTESTABLE
    return Verdict.NO_DIFFERENCE if p >= alpha else direction


def smoke_reason(n: int, min_pairs: int, smoke: bool) -> str:
    """Why a comparison of ``n`` pairs is a smoke run, in words."""
    if smoke:
        return "a --quick study, whose budgets only exercise the pipeline"
    return f"{n} paired seeds, fewer than the {min_pairs} a verdict needs (min_pairs)"


def sentence(
    optimizer: str,
    baseline: str,
    outcome: str,
    test: PairedTest,
    alpha: float,
    *,
    min_pairs: int,
    smoke: bool = False,
) -> str:
    """One plain-words sentence: does ``optimizer`` differ from ``baseline`` on ``outcome``?

    The verdict is ``judge``'s; the Wilcoxon p and, when the rank test cannot reach alpha at
    this n, that fact are stated beside it. A smoke run states its numbers and why they make
    no verdict.
    """
    spec = PER_SEED_OUTCOMES[outcome]
    if spec.higher_is_better is None:
        raise ValueError(f"outcome {outcome!r} is descriptive; allowed: {list(TESTED)}")
    found = judge(test, alpha, spec.higher_is_better, min_pairs=min_pairs, smoke=smoke)
    difference = f"{optimizer} - {baseline} on {spec.label} = {test.mean_diff:+.4g}"
    if found is Verdict.SMOKE:
        return (
            f"SMOKE RUN, no verdict ({smoke_reason(test.n, min_pairs, smoke)}): "
            f"{difference} over {test.n} seed(s)."
        )
    if test.n < 2:
        return (
            f"{optimizer} vs {baseline}: not testable on {spec.label} "
            f"({test.n} seed(s) where both runs completed)."
        )
    if test.sd_diff == 0:
        return (
            f"{optimizer} vs {baseline}: {spec.label} differs by exactly {test.mean_diff:+.4g} "
            f"on every one of {test.n} seeds; no variance, so no test: {found}."
        )
    level = f"{1 - alpha:.0%} CI"
    numbers = (
        f"mean difference {optimizer} - {baseline} = {test.mean_diff:+.4g} "
        f"({level} [{test.ci[0]:+.4g}, {test.ci[1]:+.4g}]), "
        f"paired t p = {format_p(test.p_t, alpha)}, "
        f"Wilcoxon p = {format_p(test.p_w, alpha)}, d_z = {test.d_z:+.2f}, n = {test.n}"
    )
    floor = min_wilcoxon_p(test.n)
    if floor >= alpha:
        numbers += f"; Wilcoxon cannot go below p = {floor:.3g} with {test.n} seeds"
    if found is Verdict.NO_DIFFERENCE:
        return (
            f"No significant difference in {spec.label} between {optimizer} and {baseline} "
            f"at alpha = {alpha:g} ({numbers})."
        )
    return f"{optimizer} is significantly {found} than {baseline} on {spec.label} ({numbers})."


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One optimizer against the baseline: a paired test per TESTED outcome, and the verdict on
    the primary one, as a Verdict and as a sentence."""

    optimizer: str
    tests: dict[str, PairedTest]
    verdict: Verdict
    sentence: str


def compare(
    per_seed: Mapping[str, Mapping[str, Sequence[float]]],
    baseline: str,
    primary: str,
    alpha: float,
    *,
    min_pairs: int,
    smoke: bool = False,
) -> list[Comparison]:
    """Every optimizer of ``per_seed`` (optimizer -> outcome -> values in seed order) but the
    baseline, tested against it on every TESTED outcome."""
    comparisons = []
    better = PER_SEED_OUTCOMES[primary].higher_is_better
    for optimizer, values in per_seed.items():
        if optimizer == baseline:
            continue
        tests = {
            outcome: paired_test(per_seed[baseline][outcome], values[outcome], alpha)
            for outcome in TESTED
        }
        test = tests[primary]
        words = sentence(optimizer, baseline, primary, test, alpha, min_pairs=min_pairs,
                         smoke=smoke)  # fmt: skip
        found = judge(test, alpha, better, min_pairs=min_pairs, smoke=smoke)
        comparisons.append(Comparison(optimizer, tests, found, words))
    return comparisons


def is_smoke(comparisons: Sequence[Comparison]) -> bool:
    """Whether a report is a smoke run: every comparison in it is one."""
    return bool(comparisons) and all(c.verdict is Verdict.SMOKE for c in comparisons)
