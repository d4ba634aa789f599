"""The workload suite (conf/study/suite.yaml, gradalign.report.suite): its presets, Holm's
correction and the effects' intervals against independent formulas, win/tie/loss, a page and a
forest plot for any number of workloads (a sixth one needs no code), and (slow) the quick suite
end to end."""

import dataclasses
import math
import shutil
import types

import numpy as np
import pytest
from helpers import REPO_ROOT, SIGNIFICANCE, runs
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from scipy import stats as scipy_stats
from test_study import parse as parse_study
from test_study import study

from gradalign.config import register_resolvers
from gradalign.report.build import Report
from gradalign.report.configs import compose_optimizer
from gradalign.report.finals import FinalResult
from gradalign.report.stats import compare, holm
from gradalign.report.study import SUMMARIES, part_settings
from gradalign.report.suite import effects, plot_forest, render, tally

WORKLOADS = ("mnist1d_mlp", "mnist1d_cnn", "mnist1d_gru", "digits", "charlm")


def parse(root, *argv):
    return parse_study(*argv, root=root)


SUITE = parse(REPO_ROOT, "--suite").report  # adam the baseline, best_val_loss, alpha 0.05


def holm_by_definition(p_values, alpha):
    """The indices Holm's step-down procedure rejects at ``alpha``: walk the p values in
    ascending order, rejecting while p_(k) <= alpha / (m - k), k = 0, 1, ...; stop at the first
    that fails."""
    order = np.argsort(p_values)
    rejected = set()
    for k, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - k):
            break
        rejected.add(int(i))
    return rejected


def test_holm_matches_a_worked_example_and_the_step_down_procedure():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = list(rng.uniform(0, 0.2, size=rng.integers(1, 12)))
        adjusted = holm(p)
        for alpha in rng.uniform(0, 0.3, size=5):
            assert {i for i, a in enumerate(adjusted) if a <= alpha} == holm_by_definition(p, alpha)


def test_holm_leaves_untestable_comparisons_out_of_the_family():
    adjusted = holm([0.01, math.nan, 0.02])
    assert math.isnan(adjusted[1]) and adjusted[0] == adjusted[2] == pytest.approx(0.02)


def finals(optimizer, values, accuracy=0.9):
    return [
        FinalResult(
            optimizer,
            seed,
            f"{optimizer}{seed}",
            False,
            False,
            "h",
            {},
            {"best_val_loss": v, "test_acc_at_best": accuracy},
        )  # fmt: skip
        for seed, v in enumerate(values, start=1)
    ]


def report(workload, per_optimizer, tmp_path, reference=None, settings=None):
    """A written report of one workload as the suite reads it (compared with ``settings``:
    SUITE's unless given)."""
    settings = settings or SUITE
    results = [r for name, values in per_optimizer.items() for r in finals(name, values)]
    per_seed = {
        name: {o: [r.outcomes.get(o, math.nan) for r in results if r.optimizer == name]
               for o in ("best_val_loss", "final_val_loss", "test_acc_at_best", "final_test_acc")}
        for name in per_optimizer
    }  # fmt: skip
    cfg = OmegaConf.create(
        {
            "dataset": {"name": f"data-{workload}"},
            "model": {"name": "m"},
            "reference": reference or {},
        }  # fmt: skip
    )
    plan = types.SimpleNamespace(
        compositions={"adam": types.SimpleNamespace(cfg=cfg)}, final_epochs="3"
    )
    hyper = {name: {"optimizer.lr": "0.01"} for name in per_optimizer}
    comparisons = compare(per_seed, "adam", "best_val_loss", 0.05, min_pairs=settings.min_pairs,
                          smoke=settings.smoke)  # fmt: skip
    return Report(tmp_path / workload, "run", plan, results, hyper, comparisons)


ADAM = [1.00, 1.10, 0.90, 1.05, 0.95]


def six_workloads(tmp_path, settings=None):
    """Six workloads: gao clearly better on the first two, clearly worse on the third, noise
    elsewhere; gao_update noise everywhere."""
    noise = [0.003, -0.004, 0.001, 0.002, -0.003]
    gao = {
        "w1": [a - 0.10 + n for a, n in zip(ADAM, noise, strict=True)],
        "w2": [a - 0.05 + n for a, n in zip(ADAM, noise, strict=True)],
        "w3": [a + 0.08 + n for a, n in zip(ADAM, noise, strict=True)],
        "w4": [a + n for a, n in zip(ADAM, noise, strict=True)],
        "w5": [a + 5 * n for a, n in zip(ADAM, noise, strict=True)],
        "w6": [a - n for a, n in zip(ADAM, noise, strict=True)],
    }
    update = [a + 2 * n for a, n in zip(ADAM, reversed(noise), strict=True)]
    return {
        w: report(w, {"adam": ADAM, "gao": values, "gao_update": update}, tmp_path,
                  reference={"test_acc": 0.94, "source": "paper"} if w == "w1" else None,
                  settings=settings)
        for w, values in gao.items()
    }  # fmt: skip


def test_effects_are_paired_differences_holm_corrected_over_the_whole_suite(tmp_path):
    reports = six_workloads(tmp_path)
    found = effects(reports, SUITE)
    assert [(e.workload, e.optimizer) for e in found][:3] == [
        ("w1", "gao"), ("w1", "gao_update"), ("w2", "gao")]  # fmt: skip
    assert len(found) == 12
    raw = []
    for e in found:  # each against scipy's paired t-test and the t-interval, computed anew
        base = np.array(ADAM)
        ours = [r for r in reports[e.workload].finals if r.optimizer == e.optimizer]
        other = np.array([r.outcomes["best_val_loss"] for r in ours])
        d = other - base
        half = scipy_stats.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)
        assert e.test.ci == pytest.approx((d.mean() - half, d.mean() + half))
        assert e.test.p_t == pytest.approx(scipy_stats.ttest_rel(other, base).pvalue)
        assert e.baseline_mean == pytest.approx(base.mean())
        assert e.relative == pytest.approx(
            tuple(100 * v / base.mean() for v in (d.mean(), d.mean() - half, d.mean() + half))
        )
        raw.append(e.test.p_t)
    m = len(raw)
    order = sorted(range(m), key=raw.__getitem__)
    expected = {}
    for rank, i in enumerate(order):  # the Holm formula, written out again
        expected[i] = max(min(1, (m - j) * raw[order[j]]) for j in range(rank + 1))
    assert [e.p_holm for e in found] == pytest.approx([expected[i] for i in range(m)])
    results = {(e.workload, e.optimizer): e.result for e in found}
    assert results["w1", "gao"] == results["w2", "gao"] == "win"  # lower val loss
    assert results["w3", "gao"] == "loss"
    assert {results[w, "gao"] for w in ("w4", "w5", "w6")} == {"tie"}
    assert tally(found) == {
        "gao": {"win": 2, "tie": 3, "loss": 1, "untested": 0, "smoke run": 0},
        "gao_update": {"win": 0, "tie": 6, "loss": 0, "untested": 0, "smoke run": 0},
    }


def render_six(tmp_path, settings, reports):
    """suite.md of ``reports`` (six_workloads'), each workload a part of study ``settings``."""
    named = tuple(dataclasses.replace(settings.parts[0], name=w, label=w) for w in reports)
    parts = {w: part_settings(settings, settings.parts[0], "n") for w in reports}
    found = effects(reports, settings.report)
    return render(dataclasses.replace(settings, parts=named), "six", parts, reports, found, "rid")


def test_a_quick_suite_is_a_smoke_run_with_no_verdict_on_its_page(tmp_path):
    """The quick suite's page once counted "0 losses" where the console said "significantly
    worse": a quick suite shows its numbers as a smoke run, with no verdict in any words."""
    quick = parse(REPO_ROOT, "--suite", "--quick")
    reports = six_workloads(tmp_path, quick.report)  # the six's clear effects, judged quick
    found = effects(reports, quick.report)
    assert {e.result for e in found} == {"smoke run"} and all(math.isnan(e.p_holm) for e in found)
    text = render_six(tmp_path, quick, reports)
    assert "# Workload suite `six` (SMOKE RUN)" in text and "## SMOKE RUN: no verdict" in text
    assert "**gao** against adam over 6 workloads: smoke run, numbers only, no verdict." in text
    assert not SIGNIFICANCE.search(text), SIGNIFICANCE.search(text)
    assert "| w1 | gao | -0.1002 [" in text  # the numbers are still there
    full = render_six(tmp_path, parse(REPO_ROOT, "--suite"), six_workloads(tmp_path))
    assert SIGNIFICANCE.search(full) and "SMOKE" not in full  # a powered suite still judges


def test_an_under_powered_workload_is_left_out_of_the_holm_family(tmp_path):
    reports = six_workloads(tmp_path)
    reports["w1"] = report("w1", {"adam": ADAM[:3], "gao": ADAM[:3], "gao_update": ADAM[:3]},
                           tmp_path)  # fmt: skip
    found = effects(reports, SUITE)
    assert [e.result for e in found[:2]] == ["smoke run", "smoke run"]
    assert sum(math.isfinite(e.p_holm) for e in found) == 10  # the family: the tested ones
    assert tally(found)["gao"] == {"win": 1, "tie": 3, "loss": 1, "untested": 0, "smoke run": 1}


def test_one_seed_is_untested_not_a_tie(tmp_path):
    reports = {"w": report("w", {"adam": [1.0], "gao": [0.5]}, tmp_path)}
    (effect,) = effects(reports, SUITE)
    assert effect.result == "untested" and math.isnan(effect.p_holm)


def test_the_suite_preset_is_five_workloads_each_an_experiment_preset():
    suite = parse(REPO_ROOT, "--suite")
    assert suite.summary == "suite" and suite.preset == "suite" and "suite" in SUMMARIES
    assert [p.name for p in suite.parts] == list(WORKLOADS)
    assert suite.report.optimizers == ("adam", "gao", "gao_update")
    assert suite.report.final_epochs is None  # finals train for the workload's own budget
    assert suite.report.primary == "best_val_loss" and len(suite.report.seeds) == 5
    quick = parse(REPO_ROOT, "--suite", "--quick")
    assert quick.trials == 2 and quick.report.overrides[-1] == "trainer.epochs=1"


def test_the_suite_prunes_its_sweeps_unless_told_otherwise(tmp_path):
    assert parse(REPO_ROOT, "--suite").pruner == "median"  # the protocol of its result
    assert parse(REPO_ROOT, "--suite", "--pruner", "none").pruner == "none"
    assert parse(REPO_ROOT, "--suite", "--quick").pruner == "none"  # 2 trials: none to prune
    assert parse(REPO_ROOT, "--suite", "--quick", "--pruner", "median").pruner == "median"
    assert parse(REPO_ROOT).pruner == "none"  # a preset without the key: every trial trains
    shutil.copytree(REPO_ROOT / "conf", tmp_path / "conf")
    suite = tmp_path / "conf" / "study" / "suite.yaml"
    suite.write_text(suite.read_text().replace("pruner: median", "pruner: meadian", 1))
    with pytest.raises(ValueError, match=r"invalid setting pruner='meadian': must be one of \["):
        parse(tmp_path, "--suite")


@pytest.mark.parametrize("workload", WORKLOADS)
def test_each_workload_preset_sets_budget_objective_and_search_space(workload):
    register_resolvers(REPO_ROOT)
    suite = parse(REPO_ROOT, "--suite")
    (part,) = [p for p in suite.parts if p.name == workload]
    settings = part_settings(suite, part, "n")
    raw = OmegaConf.load(REPO_ROOT / "conf" / "experiment" / f"{workload}.yaml")
    for optimizer in settings.optimizers:
        cfg = compose_optimizer(settings.conf_dir, optimizer, settings.overrides_of(optimizer))
        assert cfg.cfg.trainer.epochs == raw.trainer.epochs and cfg.cfg.objective == "best"
        assert cfg.cfg.tracking.experiment == "workloads"
        searched = {"optimizer.lr"} | ({"optimizer.beta"} if optimizer != "adam" else set())
        assert cfg.searched == searched
    if workload == "mnist1d_mlp":  # the seed audit's part (d): the note's set-up, carved val
        assert cfg.cfg.dataset.validation == "carved" and cfg.cfg.model.residual is False
        assert list(cfg.cfg.model.hidden) == [128, 128] and cfg.cfg.trainer.batch_size == 64


def test_a_sixth_workload_is_a_preset_and_a_part_with_no_code(tmp_path):
    shutil.copytree(REPO_ROOT / "conf", tmp_path / "conf")
    (tmp_path / "conf" / "experiment" / "digits_mlp.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /dataset: digits\n  - override /model: linear\n"
        "trainer:\n  epochs: 4\nobjective: best\ntracking:\n  experiment: workloads\n"
    )
    suite = tmp_path / "conf" / "study" / "suite.yaml"
    suite.write_text(
        suite.read_text().replace(
            "quick:", "  digits_linear:\n    overrides: [experiment=digits_mlp]\nquick:", 1
        )
    )
    (tmp_path / "train.py").touch()
    settings = parse(tmp_path, "--suite")
    assert [p.name for p in settings.parts] == [*WORKLOADS, "digits_linear"]
    sixth = part_settings(settings, settings.parts[-1], "n")
    register_resolvers(tmp_path)  # ${repo_root:} is the copy's, as a study there would see it
    try:
        cfg = compose_optimizer(sixth.conf_dir, "gao", sixth.overrides_of("gao")).cfg
    finally:
        register_resolvers(REPO_ROOT)  # the resolver is global: the tests after us need ours
    assert (cfg.model.name, cfg.dataset.name, cfg.trainer.epochs) == ("linear", "digits", 4)
    # the summary reads whatever parts there are: six here, no name known in advance
    reports = six_workloads(tmp_path)
    parts = {w: part_settings(settings, settings.parts[0], "n") for w in reports}
    found = effects(reports, SUITE)
    named = tuple(dataclasses.replace(settings.parts[0], name=w, label=w) for w in reports)
    text = render(dataclasses.replace(settings, parts=named), "six", parts, reports, found, "rid")
    for w in reports:
        assert f"| {w} | data-{w} / m | 3 |" in text
        assert text.count(f"| {w} | gao") == 2 and f"**{w}**" in text
    assert "**gao** against adam over 6 workloads: 2 wins (w1, w2), 3 ties, 1 loss (w3)." in text
    assert "**gao_update** against adam over 6 workloads: 0 wins, 6 ties, 0 losses." in text
    assert "| gao | 2 | 3 | 1 | 0 |" in text and "94% (paper)" in text
    assert "Holm-corrected over 12 comparisons" in text
    plot_forest(found, tmp_path / "forest.png", "best_val_loss", "95% CI")
    assert (tmp_path / "forest.png").stat().st_size > 10_000


@pytest.mark.slow
def test_quick_suite_end_to_end(tmp_path):
    done = study(tmp_path, "--suite", "--quick", "--name", "suite")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_quick_suite(tmp_path, "suite", done.stdout)
    assert "against adam over 5 workloads: smoke run, numbers only, no verdict." in done.stderr
    assert not SIGNIFICANCE.search(done.stderr), SIGNIFICANCE.search(done.stderr)  # the console

    again = study(tmp_path, "--suite", "--quick")  # the summary alone: nothing to sweep or train
    assert again.returncode == 0, again.stderr[-3000:]
    assert "15 sweep(s), 15 stored already" in again.stderr
    assert not [
        line
        for line in again.stderr.splitlines()
        if "final run(s) to train" in line and not line.split(": ")[1].startswith("0 ")
    ]


def assert_quick_suite(root, name, stdout):
    """What a quick suite named ``name`` run with ``paths.outputs=<root>/out`` and the store
    ``<root>/mlflow.db`` must have written."""
    folder = root / "out" / "report" / name
    assert stdout.strip() == str(folder / "suite.md")
    text = (folder / "suite.md").read_text()
    for section in ("## SMOKE RUN: no verdict", "tuned, on each workload", "## Effects on",
                    "## Figure", "own numbers"):  # fmt: skip
        assert section in text
    assert "## Wins, ties" not in text  # a quick suite counts no wins, ties or losses
    for workload in WORKLOADS:
        part = (root / "out" / "report" / f"{name}-{workload}" / "report.md").read_text()
        assert "## Final runs: 1 epochs" in part  # the workload's budget, as quick sets it
        assert text.count(f"| {workload} | gao") == 2  # gao and gao_update rows
        assert not SIGNIFICANCE.search(part), SIGNIFICANCE.search(part)
    assert not SIGNIFICANCE.search(text), SIGNIFICANCE.search(text)
    assert (folder / "suite_forest.png").stat().st_size > 10_000
    recorded = runs(f"sqlite:///{root / 'mlflow.db'}", experiment="workloads-quick")
    (suite,) = [r for r in recorded if r.data.tags["stage"] == "study"]
    reports = [r for r in recorded if r.data.tags["stage"] == "report"]
    assert {r.data.tags["mlflow.parentRunId"] for r in reports} == {suite.info.run_id}
    assert len(reports) == 5
    verdicts = {k: v for k, v in suite.data.tags.items() if k.startswith("verdict/")}
    assert set(verdicts) == {f"verdict/{w}/{o}" for w in WORKLOADS for o in ("gao", "gao_update")}
    assert set(verdicts.values()) == {"smoke run"} and suite.data.tags["smoke_run"] == "true"
    for view in [
        suite.data.tags["mlflow.note.content"],
        *(r.data.tags["verdict/gao"] for r in reports),
    ]:
        assert not SIGNIFICANCE.search(view), SIGNIFICANCE.search(view)
    for w in WORKLOADS:
        for stat in ("mean_diff", "ci_low", "ci_high"):
            assert f"{w}/gao/{stat}" in suite.data.metrics
        assert f"{w}/gao/p_t" not in suite.data.metrics  # a smoke run's tests are not logged
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts(suite.info.run_id)}
    assert {"suite.md", "suite_forest.png"} <= artifacts


def test_a_preset_with_an_unknown_summary_is_refused_before_anything_runs(tmp_path):
    shutil.copytree(REPO_ROOT / "conf", tmp_path / "conf")
    suite = tmp_path / "conf" / "study" / "suite.yaml"
    suite.write_text(suite.read_text().replace("summary: suite", "summary: forest"))
    with pytest.raises(ValueError, match=r"summary='forest': must be one of \['audit', 'suite'\]"):
        parse(tmp_path, "--suite")
    text = suite.read_text().replace("summary: forest", "summary: suite")
    suite.write_text(text.replace("final_epochs: null", "final_epochs: 0"))
    with pytest.raises(ValueError, match=r"final_epochs=0: must be an integer >= 1, or null"):
        parse(tmp_path, "--suite")
