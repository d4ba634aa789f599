"""gradalign.report.claims: each claim's per-seed quantity against a direct computation, and the
verdicts the paired numbers give."""

import math

import pytest
from scipy import stats

from gradalign.report import claims
from gradalign.report.claims import CLAIMS, share_below
from gradalign.report.finals import FinalResult
from gradalign.report.stats import outcomes
from gradalign.schema import Metric

BY_KEY = {claim.key: claim for claim in CLAIMS}


def check(claim, challenger, baseline, alpha, min_pairs=2, **options):
    """The claim's check; these tests judge even two seeds (min_pairs=2), to test the words."""
    return claims.check(claim, challenger, baseline, alpha, min_pairs=min_pairs, **options)


def run(optimizer, seed, val_loss, test_acc=None):
    test_acc = test_acc or [0.5] * len(val_loss)
    curves = {Metric.VAL_LOSS: list(val_loss), Metric.TEST_ACC: list(test_acc)}
    return FinalResult(optimizer, seed, f"{optimizer}{seed}", False, False, "h", curves,
                       outcomes(val_loss, test_acc, diverged=False))  # fmt: skip


def test_share_below_counts_the_epochs_both_completed():
    assert share_below([1, 1, 3, 0.5], [2, 2, 2, 2]) == 0.75
    assert share_below([1, 1], [2, 2, 0]) == 1.0  # a shorter run: only the common epochs
    assert math.isnan(share_below([], [1.0]))


def test_per_seed_quantities_are_what_the_claims_say():
    gao = [run("gao", s, [2.0, 1.0 + 0.1 * s, 1.5 + 0.1 * s], [0.1, 0.6, 0.5]) for s in (1, 2, 3)]
    adam = [run("adam", s, [2.1, 1.2, 2.0 + 0.2 * s], [0.2, 0.5, 0.4]) for s in (1, 2, 3)]
    stable = check(BY_KEY["stable"], gao, adam, alpha=0.05)
    assert stable.challenger == pytest.approx([0.5, 0.5, 0.5])  # last minus minimum
    assert stable.baseline == pytest.approx([0.8 + 0.2 * s for s in (1, 2, 3)])
    score = check(BY_KEY["score"], gao, adam, alpha=0.05)
    assert score.challenger == pytest.approx([1.1, 1.2, 1.3]) and score.baseline == [1.2] * 3
    accuracy = check(BY_KEY["test_acc"], gao, adam, alpha=0.05)
    assert accuracy.challenger == [0.6] * 3 and accuracy.baseline == [0.5] * 3  # at the minimum
    t = stats.ttest_rel(score.challenger, score.baseline)
    assert score.test.p_t == pytest.approx(t.pvalue)


def test_a_claim_of_throughout_holds_only_when_every_epoch_of_every_seed_is_lower():
    adam = [run("adam", s, [2.0, 1.5, 1.4]) for s in (1, 2)]
    always = [run("gao", s, [1.9, 1.4, 1.3]) for s in (1, 2)]
    assert check(BY_KEY["throughout"], always, adam, 0.05).verdict == "holds"
    never = [run("gao", s, [2.1, 1.6, 1.5]) for s in (1, 2)]
    assert check(BY_KEY["throughout"], never, adam, 0.05).verdict == "contradicted"
    mixed = [run("gao", 1, [1.9, 1.6, 1.3]), run("gao", 2, [2.1, 1.4, 1.5])]
    verdict = check(BY_KEY["throughout"], mixed, adam, 0.05).verdict
    assert verdict in ("not shown", "partly")


def test_verdicts_follow_the_claimed_direction():
    adam = [run("adam", s, [2.0, 1.0 + 0.01 * s, 1.5]) for s in range(1, 9)]
    better = [run("gao", s, [2.0, 0.9 + 0.013 * s, 1.5]) for s in range(1, 9)]
    worse = [run("gao", s, [2.0, 1.1 + 0.007 * s, 1.6]) for s in range(1, 9)]
    assert check(BY_KEY["score"], better, adam, 0.05).verdict == "holds"
    assert check(BY_KEY["score"], worse, adam, 0.05).verdict == "contradicted"
    noisy = [
        run("gao", s, [2.0, 1.0 + 0.01 * s + (0.05 if s % 2 else -0.05), 1.5]) for s in range(1, 9)
    ]
    assert check(BY_KEY["score"], noisy, adam, 0.05).verdict == "not shown"
    one = check(BY_KEY["score"], better[:1], adam[:1], 0.05)
    assert one.verdict == "one seed" and one.text.startswith("one seed: 0.9130 vs 1.0100")


def test_one_seed_shows_its_difference_and_no_test():
    one = check(BY_KEY["score"], [run("gao", 0, [2.0, 0.9, 1.5])], [run("adam", 0, [2.0, 1.2])],
                alpha=0.05)  # fmt: skip
    assert one.verdict == "one seed" and one.test.mean_diff == pytest.approx(-0.3)
    assert one.text == "one seed: 0.9000 vs 1.2000; diff -0.3, no test (n = 1)"


def test_a_smoke_run_judges_no_claim_and_shows_its_numbers_without_a_test():
    """Two seeds below the report's min_pairs, or a quick study: "smoke run", never "holds" or
    "contradicted", even for a challenger lower in every epoch; the cell keeps the difference
    and its interval, not the p or d_z that would read as a verdict."""
    adam = [run("adam", s, [2.0, 1.5, 1.4 + 0.01 * s]) for s in (1, 2)]
    always = [run("gao", s, [1.9, 1.4, 1.3 + 0.02 * s]) for s in (1, 2)]
    for claim in CLAIMS:
        under = check(claim, always, adam, 0.05, min_pairs=5)
        assert under.verdict == "smoke run", claim.key
        assert under.text.startswith("smoke run: ") and "p =" not in under.text
    assert check(BY_KEY["score"], always, adam, 0.05).verdict == "holds"  # judged at min_pairs 2
    quick = check(BY_KEY["score"], always * 3, adam * 3, 0.05, smoke=True)
    assert quick.verdict == "smoke run" and quick.text.endswith(", n = 6")
