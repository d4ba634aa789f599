"""report_stats against hand-computed values: per-seed outcomes, the paired t-test from its
formula, Cohen's d_z, exact Wilcoxon p-values counted by hand, power, and the verdict's words."""

import math

import numpy as np
import pytest
from helpers import SIGNIFICANCE
from scipy import stats

from gradalign.report import claims, suite
from gradalign.report.stats import (
    PairedTest,
    Verdict,
    compare,
    detectable_effect,
    format_p,
    judge,
    mean_std,
    min_wilcoxon_p,
    outcomes,
    paired_test,
    sentence,
    t_test_power,
)

BASE = [1.00, 1.10, 0.90, 1.05, 0.95]
OTHER = [0.90, 1.03, 0.84, 0.97, 0.88]  # lower everywhere: d = -0.10, -0.07, -0.06, -0.08, -0.07


def test_outcomes_of_one_run():
    val_loss = [2.0, 1.5, 1.2, 1.3, 1.6]
    test_acc = [0.1, 0.3, 0.5, 0.55, 0.52]
    got = outcomes(val_loss, test_acc, diverged=False)
    assert got == {
        "best_val_loss": 1.2,
        "best_epoch": 3.0,
        "final_val_loss": 1.6,
        "test_acc_at_best": 0.5,
        "final_test_acc": 0.52,
    }
    diverged = outcomes(val_loss[:2], test_acc[:2], diverged=True)
    assert diverged["best_val_loss"] == 1.5 and math.isnan(diverged["final_val_loss"])
    assert all(math.isnan(v) for v in outcomes([], [], diverged=True).values())


def test_summary_ignores_non_finite_values():
    s = mean_std([1.0, 2.0, 3.0, math.nan, math.inf])
    assert (s.n, s.mean, s.std) == (3, 2.0, 1.0)
    assert mean_std([math.nan]).n == 0


def test_paired_t_and_cohens_dz_match_the_formulas():
    d = np.array(OTHER) - np.array(BASE)
    n = len(d)
    mean, sd = d.mean(), d.std(ddof=1)
    test = paired_test(BASE, OTHER, alpha=0.05)
    assert test.n == n
    assert test.mean_diff == pytest.approx(mean)
    assert test.sd_diff == pytest.approx(sd)
    assert test.t == pytest.approx(mean / (sd / math.sqrt(n)))
    assert test.d_z == pytest.approx(mean / sd)
    # by hand: mean(d) = -0.076, sum of squared deviations 0.00092, sd = sqrt(0.00092/4) = 0.015166
    assert test.t == pytest.approx(-0.076 / (0.015166 / math.sqrt(5)), rel=1e-4)  # -11.2056
    assert test.d_z == pytest.approx(-0.076 / 0.015166, rel=1e-4)
    assert test.p_t == pytest.approx(2 * stats.t.sf(11.2056, 4), rel=1e-3)
    # 95% CI = mean -/+ t_.975,4 * sd / sqrt(n), t_.975,4 = 2.7764451
    half = 2.7764451 * sd / math.sqrt(n)
    assert test.ci == pytest.approx((mean - half, mean + half))


def test_wilcoxon_exact_p_values_counted_by_hand():
    # All 5 differences negative: W = 0; of the 2^5 sign patterns only "all -" and "all +" are
    # as extreme, so p = 2/32 = 0.0625, the smallest p an n=5 signed-rank test can give.
    test = paired_test(BASE, OTHER, alpha=0.05)
    assert (test.w, test.p_w) == (0.0, 0.0625)
    assert min_wilcoxon_p(5) == 0.0625 and min_wilcoxon_p(6) == 0.03125
    # d = +1, -2, +3, +4, +5: W = 2 (rank of the one negative difference). Sign patterns with a
    # rank sum <= 2 on one side: {}, {1}, {2} -> 3 of 32, doubled: p = 6/32 = 0.1875.
    mixed = paired_test([0.0] * 5, [1.0, -2.0, 3.0, 4.0, 5.0], alpha=0.05)
    assert (mixed.w, mixed.p_w) == (2.0, 0.1875)


def test_degenerate_pairs_give_nan_not_errors():
    few = paired_test([1.0, math.nan], [2.0, 3.0], alpha=0.05)
    assert few.n == 1 and few.mean_diff == 1.0 and math.isnan(few.p_t)  # the one difference
    constant = paired_test([1.0, 2.0, 3.0], [1.5, 2.5, 3.5], alpha=0.05)
    assert constant.mean_diff == 0.5 and math.isnan(constant.p_t) and math.isnan(constant.p_w)
    with pytest.raises(ValueError, match="differ in length"):
        paired_test([1.0], [1.0, 2.0], alpha=0.05)


def test_power_and_the_smallest_detectable_effect():
    assert t_test_power(0.0, 5, 0.05) == pytest.approx(0.05, abs=1e-6)  # no effect: alpha
    d = detectable_effect(5, 0.05)
    assert d == pytest.approx(1.68, abs=0.01)
    assert t_test_power(d, 5, 0.05) == pytest.approx(0.8, abs=1e-6)
    assert t_test_power(1.0, 5, 0.05) == pytest.approx(0.4014, abs=1e-4)  # scipy's nct agrees
    assert detectable_effect(20, 0.05) < d  # more seeds, smaller detectable effects


def verdict(optimizer, baseline, outcome, test, alpha, **options):
    return sentence(optimizer, baseline, outcome, test, alpha, min_pairs=5, **options)


def test_verdict_words_follow_the_data():
    better = verdict("gao", "adam", "best_val_loss", paired_test(BASE, OTHER, 0.05), 0.05)
    assert better.startswith("gao is significantly better than adam on min val loss")
    assert "cannot go below p = 0.0625 with 5 seeds" in better
    worse = verdict("gao", "adam", "final_test_acc", paired_test(BASE, OTHER, 0.05), 0.05)
    assert worse.startswith("gao is significantly worse")  # lower accuracy is worse
    noisy = paired_test(BASE, [1.01, 1.05, 0.95, 1.02, 0.97], 0.05)  # d: +.01 -.05 +.05 -.03 +.02
    assert verdict("gao", "adam", "best_val_loss", noisy, 0.05).startswith(
        "No significant difference in min val loss between gao and adam"
    )
    with pytest.raises(ValueError, match="descriptive"):
        verdict("gao", "adam", "best_epoch", noisy, 0.05)


def test_too_few_pairs_or_a_quick_study_make_a_smoke_run_with_no_verdict():
    """The quick study's numbers (n = 2, every seed moved by nearly the same amount: p tiny,
    d_z huge) once read "gao is significantly worse"; below min_pairs, or in a quick study,
    they are a smoke run."""
    two = paired_test([1.0, 1.1], [1.2, 1.3000001], 0.05)
    assert two.p_t < 1e-5 and abs(two.d_z) > 1e5  # what the t-test says of n = 2
    assert judge(two, 0.05, False, min_pairs=5) is Verdict.SMOKE
    words = verdict("gao", "adam", "best_val_loss", two, 0.05)
    assert words.startswith("SMOKE RUN, no verdict (2 paired seeds, fewer than the 5")
    assert "+0.2" in words and not SIGNIFICANCE.search(words)
    powered = paired_test(BASE, OTHER, 0.05)  # n = 5: p = 0.0004
    assert judge(powered, 0.05, False, min_pairs=5) is Verdict.BETTER
    assert judge(powered, 0.05, False, min_pairs=6) is Verdict.SMOKE
    quick = verdict("gao", "adam", "best_val_loss", powered, 0.05, smoke=True)
    assert quick.startswith("SMOKE RUN, no verdict (a --quick study") and not SIGNIFICANCE.search(
        quick
    )
    assert judge(powered, 0.05, False, min_pairs=5, smoke=True) is Verdict.SMOKE
    one = paired_test([1.0], [1.2], 0.05)  # one seed: no test, not a smoke run
    assert judge(one, 0.05, False, min_pairs=5) is Verdict.UNTESTABLE
    constant = paired_test([1.0, 2.0, 3.0, 4.0, 5.0], [1.5, 2.5, 3.5, 4.5, 5.5], 0.05)
    assert judge(constant, 0.05, False, min_pairs=5) is Verdict.WORSE  # the test's limit
    assert verdict("gao", "adam", "best_val_loss", constant, 0.05).endswith("no test: worse.")


def test_the_suite_and_the_claims_words_are_the_one_verdicts():
    """Every verdict has a word in each view, and each view's words are distinct."""
    for words in (suite.WORDS, claims.WORDS):
        assert set(words) == set(Verdict) and len(set(words.values())) == len(Verdict)
    assert suite.WORDS[Verdict.BETTER] == "win" and claims.WORDS[Verdict.WORSE] == "contradicted"


def test_compare_tests_every_optimizer_but_the_baseline():
    per_seed = {
        name: {
            o: list(values)
            for o in (
                "best_val_loss",
                "final_val_loss",
                "test_acc_at_best",
                "final_test_acc",
                "best_epoch",
            )
        }
        for name, values in (("adam", BASE), ("gao", OTHER), ("sgd", BASE))
    }
    result = compare(per_seed, "adam", "best_val_loss", 0.05, min_pairs=5)
    assert [c.optimizer for c in result] == ["gao", "sgd"]
    assert "best_epoch" not in result[0].tests
    assert result[0].sentence.startswith("gao is significantly better")
    assert result[0].verdict is Verdict.BETTER


def test_a_p_value_is_never_rounded_across_alpha():
    """The default study of 2026-12-07: paired t p = 0.04996 printed as "0.05" beside
    "significantly better"."""
    assert format_p(0.04996037603584113, 0.05) == "0.04996"
    assert format_p(0.0499999, 0.05) == "0.0499999"
    assert format_p(0.0500004, 0.05) == "0.05"  # not below alpha: "0.05" is on its side
    assert format_p(0.0123456, 0.05) == "0.0123"
    assert format_p(0.00999, 0.01) == "0.00999"
    assert format_p(0.0099996, 0.01) == "0.0099996"
    assert format_p(math.nan, 0.05) == "nan"
    recorded = PairedTest(  # the study's numbers, as its report computed them
        n=5, mean_diff=-0.02449, sd_diff=0.01972, ci=(-0.04898, -6.833e-06), t=-2.777,
        p_t=0.04996037603584113, w=1.0, p_w=0.125, d_z=-1.242,
    )  # fmt: skip
    words = verdict("gao", "adam", "best_val_loss", recorded, 0.05)
    assert words.startswith("gao is significantly better than adam on min val loss")
    assert "paired t p = 0.04996, Wilcoxon p = 0.125," in words
