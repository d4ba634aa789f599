"""study.py: its presets (conf/study/), flags and overrides, the sweeps a study needs (each
stored under a name derived from what it sweeps, shared by parts that need the same, counted
down by what is stored), a failing sweep's error, and (slow) the quick study and the quick audit
end to end in subprocesses, rerun without sweeping or training again."""

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time

import optuna
import pytest
from helpers import REPO_ROOT, SIGNIFICANCE, runs
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.storages import InMemoryStorage

from gradalign.checks import UserError
from gradalign.optuna_storage import open_storage
from gradalign.report import sweep_progress
from gradalign.report.settings import add_study_arguments, study_settings_from_args
from gradalign.report.study import (
    STORAGE,
    StudySweep,
    named,
    part_settings,
    run_sweeps,
    study_label,
    sweep_commands,
    sweep_of,
    trials_left,
)


def parse(*argv, root=REPO_ROOT):
    """study.py's settings from its command line ``argv``, in checkout ``root``."""
    parser = argparse.ArgumentParser()
    add_study_arguments(parser, root)
    return study_settings_from_args(root, parser.parse_args(argv), "cmd")


def test_quick_preset_then_flags_then_user_overrides():
    full = parse()
    assert (full.trials, full.report.final_epochs, len(full.report.seeds)) == (30, 100, 5)
    assert full.report.overrides == () and [p.name for p in full.parts] == ["main"]
    quick = parse("--quick", "--optimizers", "adam", "gao", "gao_update", "--", "model=cnn")
    assert quick.trials == 3 and quick.report.seeds == (1, 2)
    assert quick.report.optimizers == ("adam", "gao", "gao_update")
    assert quick.report.overrides[0] == "tracking.experiment=gradient-alignment-quick"
    assert quick.report.overrides[-1] == "model=cnn"  # the user's come last: they win
    assert parse("--quick", "--trials", "5", "--seeds", "7", "8").trials == 5
    with pytest.raises(ValueError, match="trials=0"):
        parse("--trials", "0")
    with pytest.raises(ValueError, match=r"sweeps=\['x'\]: must be unset for study.py"):
        parse("--sweeps", "x")  # a study reports on its own sweeps
    with pytest.raises(ValueError, match=r"preset='nope': must be one of \[.*'seed_note'"):
        parse("--preset", "nope")


def test_the_replica_is_one_final_run_per_optimizer_in_the_notes_set_up():
    replica = parse("--preset", "seed_note")
    assert replica.report.seeds == (0,) and replica.report.final_epochs == 100
    assert replica.report.overrides == ("experiment=seed_note",) and replica.trials == 30


def test_the_audit_preset_has_its_parts_and_columns():
    audit = parse("--preset", "seed_note_audit")
    by_name = {part.name: part for part in audit.parts}
    assert set(by_name) == {"a", "b", "c1", "c2", "d", "e", "f"}
    assert by_name["a"].seeds == (0,) and audit.report.seeds == tuple(range(1, 11))
    assert {by_name[p].sweep_seed for p in ("b", "c1", "c2")} == {0, 1, 2}
    assert by_name["d"].overrides == ("dataset.validation=carved",)
    assert by_name["f"].optimizers == ("adam", "gao_update")
    assert audit.columns["(c) 3 tunings"] == ("b", "c1", "c2")
    reports = {p.name: part_settings(audit, p, "x") for p in audit.parts}
    assert reports["e"].overrides_of("adam") == reports["b"].overrides_of("adam")  # shared
    assert reports["e"].overrides_of("gao")[-1] == "search.beta='interval(0.5, 0.999)'"
    sweeps = {
        sweep_of(reports[p.name], o, p) for p in audit.parts for o in reports[p.name].optimizers
    }
    assert len(sweeps) == 10  # a and b share theirs; e reuses b's adam, f too
    assert reports["a"].name == "x-a" and reports["a"].overwrite


def test_a_sweep_is_named_by_what_it_sweeps():
    sweep = StudySweep("gao", ("experiment=seed_note",), 0)
    assert sweep.study_name == StudySweep("gao", ("experiment=seed_note",), 0).study_name
    others = {
        StudySweep("gao", (), 0),
        StudySweep("gao", ("experiment=seed_note",), 1),
        StudySweep("adam", ("experiment=seed_note",), 0),
    }
    assert sweep.study_name not in {s.study_name for s in others}
    assert sweep.study_name.startswith("gao-") and sweep.sweep_id == f"optuna:{sweep.study_name}"


def test_sweep_commands_are_train_py_multiruns_in_their_own_folders(tmp_path):
    report = parse("--quick", "--", "model=cnn").report
    root = tmp_path / "runs, 'best' (1)"  # a comma or bracket unquoted breaks a Hydra override
    sweep = StudySweep("gao", report.overrides_of("gao"), 2)
    command = sweep.command(REPO_ROOT, 4, root)
    assert command[:3] == [sys.executable, str(REPO_ROOT / "train.py"), "optimizer=gao"]
    assert command[-1] == "-m"
    assert "model=cnn" in command and "hydra.sweeper.n_trials=4" in command
    assert "hydra.sweeper.seed=2" in command
    assert f"hydra.sweeper.study_name={sweep.study_name}" in command
    quoted = [a for a in command if a.startswith(("hydra.sweep.dir=", "hydra.sweeper.storage="))]
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(quoted)}
    assert parsed["hydra.sweep.dir"] == str(root / sweep.study_name)  # never two in one
    assert parsed["hydra.sweeper.storage"] == f"sqlite:///{root / 'optuna.db'}"


def test_the_default_study_sweeps_stacked_in_studies_of_its_own(tmp_path):
    """Stacked sweeps draw their trials in batches, so they are other studies than serial ones
    (whose stored names do not change)."""
    settings = parse()
    assert settings.parallel == "stacked"
    overrides = settings.report.overrides_of("gao")
    serial, stacked = (
        StudySweep("gao", overrides, 0),
        StudySweep("gao", overrides, 0, "none", "stacked"),
    )
    digest = hashlib.sha256(json.dumps([list(overrides), 0]).encode()).hexdigest()[:10]
    assert serial.study_name == f"gao-{digest}" != stacked.study_name
    assert "parallel=stacked" in stacked.command(REPO_ROOT, 4, tmp_path)
    assert not any(a.startswith("parallel=") for a in serial.command(REPO_ROOT, 4, tmp_path))
    assert parse("--parallel", "serial").parallel == "serial"
    for preset in ("seed_note", "seed_note_audit", "suite"):  # as their results were swept
        assert parse("--preset", preset).parallel == "serial"
    assert parse("--preset", "seed_note", "--parallel", "stacked").parallel == "stacked"
    message = r"invalid setting parallel='threads': must be one of \['joblib', 'serial', 'sl"
    with pytest.raises(ValueError, match=message):
        parse("--parallel", "threads")


def test_studies_are_named_so_that_a_person_tells_them_apart(tmp_path):
    """optuna-dashboard lists studies by name: the preset, quick or not, the part, then what
    identifies the sweep (the optimizer and the digest of the rest)."""

    def names(*argv):
        settings = parse(*argv)
        labels = {}
        for part in settings.parts:
            report = part_settings(settings, part, "x")
            for optimizer in report.optimizers:
                sweep = sweep_of(report, optimizer, part, settings.pruner, settings.parallel)
                labels.setdefault(sweep, study_label(settings, part))
        return [s.study_name for s in named(InMemoryStorage(), labels).values()]

    default = names()
    key = StudySweep("gao", parse().report.overrides_of("gao"), 0, "none", "stacked").key
    assert default == [f"default.adam-{key[4:]}", f"default.{key}"]
    assert [n.split(".")[0] for n in names("--quick")] == ["default-quick"] * 2
    audit = names("--preset", "seed_note_audit")
    assert audit[0].startswith("seed_note_audit-a.adam-") and len(audit) == 10  # a, b share
    assert "seed_note_audit-c1.gao-" in " ".join(audit)
    suite = names("--preset", "suite", "--quick")
    assert suite[0].startswith("suite-quick-mnist1d_mlp.adam-")
    assert len(set(default + names("--quick") + audit + suite)) == 2 + 2 + 10 + 15


def test_a_stored_study_is_found_under_the_name_it_has_and_resumed(tmp_path):
    """A study stored before names carried labels keeps its name (the sweep's key), and one
    another preset stored is reused: the same command resumes it, running what is missing."""
    storage = tmp_path / "optuna.db"
    url = f"sqlite:///{storage}"
    adam, gao = (
        StudySweep("adam", ("experiment=seed_note",), 0),
        StudySweep("gao", ("experiment=seed_note",), 0),
    )
    legacy = optuna.create_study(study_name=gao.key, storage=url)  # gao-<digest>, as before
    for value in (1.0, 2.0):
        legacy.tell(legacy.ask(), value)
    optuna.create_study(study_name=f"seed_note.{adam.key}", storage=url)  # the replica's
    other = StudySweep("adam", (), 0)  # another sweep
    optuna.create_study(study_name=f"x.{other.key}", storage=url)
    opened = open_storage(url, 5)  # as run_study opens it, once
    studies = named(opened, {adam: "seed_note_audit-a", gao: "seed_note_audit-a"})
    assert studies[gao].study_name == gao.key and studies[gao] == gao
    assert studies[adam].study_name == f"seed_note.{adam.key}"
    assert trials_left(opened, list(studies.values()), 5) == {adam: 5, gao: 3}
    command = studies[gao].command(REPO_ROOT, 3, tmp_path)
    assert f"hydra.sweeper.study_name={gao.key}" in command
    assert studies[gao].sweep_id == f"optuna:{gao.key}"  # where the report finds its trials
    fresh = named(opened, {StudySweep("gao", (), 5): "default"})
    assert [s.study_name for s in fresh.values()] == [f"default.{StudySweep('gao', (), 5).key}"]


def test_trials_left_counts_the_completed_trials_of_each_stored_study(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / STORAGE}", 5)
    adam, gao = StudySweep("adam", (), 0), StudySweep("gao", (), 0)
    assert trials_left(storage, [adam, gao], 5) == {adam: 5, gao: 5}
    study = optuna.create_study(study_name=gao.study_name, storage=storage)
    for value in (1.0, 2.0):
        study.tell(study.ask(), value)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)  # does not count
    study.ask()  # RUNNING (a killed sweep's): not done, its sweep completes it from MLflow
    assert trials_left(storage, [adam, gao], 5) == {adam: 5, gao: 3}
    assert trials_left(storage, [gao], 2) == {gao: 0}
    # each sweep started gets the study's budget, not what is missing: the sweep loop runs
    # the missing trials itself (3 here; given n_trials=3 it would run 1)
    commands = sweep_commands(REPO_ROOT, tmp_path, storage, [adam, gao], 5)
    assert [c for c in commands[gao.study_name] if "n_trials" in c] == ["hydra.sweeper.n_trials=5"]
    assert "hydra.sweeper.n_trials=5" in commands[adam.study_name]
    assert sweep_commands(REPO_ROOT, tmp_path, storage, [adam, gao], 2).keys() == {adam.study_name}


def test_a_failing_sweep_stops_the_others_and_shows_its_log(tmp_path):
    commands = {
        "ok": [sys.executable, "-c", "import time; time.sleep(30)"],
        "bad": [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
    }
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"(?s)sweep bad failed \(exit 3\).*boom"):
        run_sweeps(commands, tmp_path, jobs=2)
    assert time.perf_counter() - start < 20  # "ok" was stopped, not waited for
    assert (tmp_path / "bad.log").read_text().strip() == "boom"


def test_sweep_progress_in_a_log_is_a_few_plain_lines(tmp_path, monkeypatch):
    """Not on a terminal, each sweep gets a plain line when first seen, then one when its count
    changed and a minute passed, and a last one at the end if it changed: trials counted (as
    n_trials counts them) of the budget, the best finite objective in the study's direction,
    the time left at the rate of the trials this run saw end."""
    clock = [0.0]
    monkeypatch.setattr(sweep_progress.time, "monotonic", lambda: clock[0])
    url, stream = f"sqlite:///{tmp_path / STORAGE}", io.StringIO()
    progress = sweep_progress.SweepProgress(open_storage(url, 5), {"a": 4, "b": 2}, stream)
    progress.update()  # neither sweep has created its study yet
    a = optuna.create_study(study_name="a", storage=url)
    for value in (1.5, 1.2, float("inf")):  # inf: diverged, counted, never the best
        a.tell(a.ask(), value)
    a.tell(a.ask(), state=optuna.trial.TrialState.PRUNED)
    a.tell(a.ask(), state=optuna.trial.TrialState.FAIL)  # run again: not counted
    b = optuna.create_study(study_name="b", storage=url, direction="maximize")
    b.tell(b.ask(), 0.5)
    clock[0] = 30.0
    progress.update()  # changed, but within the minute: no line
    clock[0] = 60.0
    progress.update()
    a.tell(a.ask(), 1.1)
    b.tell(b.ask(), 0.9)
    progress.close()
    unknown = "best -, time left unknown until a trial ends"
    assert stream.getvalue().splitlines() == [
        f"a: 0/4 trials, {unknown}",
        f"b: 0/2 trials, {unknown}",
        "a: 4/4 trials, best 1.2000, done",
        "b: 1/2 trials, best 0.5000, about 60 s left",  # 60 s for 1 trial, 1 left
        "a: 5/4 trials, best 1.1000, done",
        "b: 2/2 trials, best 0.9000, done",
    ]


def test_sweep_progress_on_a_terminal_rewrites_one_line_per_sweep(tmp_path):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    storage = open_storage(f"sqlite:///{tmp_path / STORAGE}", 5)
    with sweep_progress.SweepProgress(storage, {"a": 4, "b": 2}, stream) as shown:
        shown.update()
        shown.update()
    text = stream.getvalue()
    assert text.count("a: 0/4 trials, best -") >= 2 and "b: 0/2 trials" in text  # redrawn
    assert "\r" in text  # in place


def test_run_sweeps_shows_each_sweeps_progress_from_its_study(tmp_path, monkeypatch):
    monkeypatch.setattr("gradalign.report.study.PROGRESS_S", 0.0)
    url, stream = f"sqlite:///{tmp_path / STORAGE}", io.StringIO()
    script = (
        "import optuna, time; "
        f"s = optuna.create_study(study_name='s', storage='{url}'); "
        "[s.tell(s.ask(), v) for v in (0.3, 0.2)]; time.sleep(1)"
    )
    progress = sweep_progress.SweepProgress(open_storage(url, 5), {"s": 2}, stream, interval_s=0.0)
    with progress:
        run_sweeps({"s": [sys.executable, "-c", script]}, tmp_path, jobs=1, progress=progress)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "s: 0/2 trials, best -, time left unknown until a trial ends"
    assert lines[-1] == "s: 2/2 trials, best 0.2000, done"


def study(tmp_path, *argv, timeout=1200):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    command = [sys.executable, "study.py", *argv, "--", f"paths.outputs={tmp_path / 'out'}"]
    return subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
    done = study(tmp_path, "--quick", "--name", "t")
    assert done.returncode == 0, done.stderr[-3000:]
    report = tmp_path / "out" / "report" / "t"
    assert done.stdout.strip() == str(report / "report.md")
    text = (report / "report.md").read_text()
    assert "| adam |" in text and "| gao |" in text
    assert (report / "convergence_comparison.png").stat().st_size > 10_000
    # a smoke run in every view, and no verdict in any: the page, its HTML, the console, MLflow
    assert text.startswith("# adam vs gao on mnist1d / mlp (SMOKE RUN)\n")
    assert "## SMOKE RUN: no verdict" in text and "- SMOKE RUN, no verdict (a --quick study" in text
    (run,) = runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "tags.stage = 'report'",
                  experiment="gradient-alignment-quick")  # fmt: skip
    assert run.data.tags["smoke_run"] == "true"
    assert run.data.tags["verdict/gao"].startswith("SMOKE RUN, no verdict")
    assert run.data.tags["mlflow.note.content"].startswith("SMOKE RUN, no verdict")  # plain
    views = [text, (report / "report.html").read_text(), done.stderr, *run.data.tags.values()]
    for view in views:
        assert not SIGNIFICANCE.search(view), SIGNIFICANCE.search(view)
    assert "SMOKE RUN, no verdict" in done.stderr
    for optimizer in ("adam", "gao"):  # the sweeps' progress, as plain lines in a log
        name = rf"default-quick\.{optimizer}-[0-9a-f]{{10}}"
        line = rf"{name}: (\d+)/\1 trials, best \d\.\d{{4}}, done"
        assert re.search(line, done.stderr), done.stderr[-3000:]
    assert "\r" not in done.stderr

    storage = f"sqlite:///{tmp_path / 'out' / 'studies' / 'optuna.db'}"
    stored = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    assert [re.fullmatch(r"default-quick\.(\w+)-[0-9a-f]{10}", n)[1] for n in stored] == [
        "adam",
        "gao",
    ]  # what optuna-dashboard lists
    again = study(tmp_path, "--quick", "--name", "t2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 sweep(s), 2 stored already" in again.stderr  # no sweep again
    assert " trials, best " not in again.stderr  # nor its progress
    assert "0 final run(s) to train, 4 reused" in again.stderr

    taken = study(tmp_path, "--quick", "--name", "t")
    assert taken.returncode == 2 and "choose another --name" in taken.stderr


@pytest.mark.slow
def test_quick_audit_end_to_end_and_its_rerun_reuses_every_run(tmp_path):
    done = study(tmp_path, "--preset", "seed_note_audit", "--quick", "--name", "audit")
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "out" / "report" / "audit"
    assert done.stdout.strip() == str(folder / "audit.md")
    text = (folder / "audit.md").read_text()
    for section in ("## The claims", "## SMOKE RUN: no verdict", "## Figure", "## The parts"):
        assert section in text
    assert text.startswith("# Audit `audit` (SMOKE RUN): the claims, part by part")
    header = next(line for line in text.splitlines() if line.startswith("| claim"))
    assert header.count("|") == 8  # the claim and the 6 columns of conf/study/seed_note_audit
    for claim in ("tuned values", "throughout", "more stable", "validation score", "test accuracy"):
        assert claim in text
    assert "> - GAO is more stable" in text  # the note's words, quoted from the preset
    for part in ("a", "b", "c1", "c2", "d", "e", "f"):
        assert (tmp_path / "out" / "report" / f"audit-{part}" / "report.md").is_file()
    assert (folder / "audit_curves.png").stat().st_size > 10_000
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recorded = runs(uri, experiment="seed-note-audit-quick")
    assert not [
        r for r in recorded if r.info.status != "FINISHED" and r.data.tags.get("diverged") != "true"
    ]
    (audit,) = [r for r in recorded if r.data.tags["stage"] == "study"]
    reports = [r for r in recorded if r.data.tags["stage"] == "report"]
    assert len(reports) == 7
    assert {r.data.tags["mlflow.parentRunId"] for r in reports} == {audit.info.run_id}
    finals = [r for r in recorded if r.data.tags["stage"] == "final"]
    assert {r.data.tags["validation"] for r in finals} >= {"carved from train"}
    verdicts = {k: v for k, v in audit.data.tags.items() if k.startswith("verdict/")}
    assert len(verdicts) == 7 * 4 and set(verdicts.values()) == {"smoke run"}
    assert audit.data.tags["smoke_run"] == "true"
    parts = [(tmp_path / "out" / "report" / f"audit-{p}" / "report.md").read_text() for p in "ab"]
    views = [text, *parts, done.stderr, *audit.data.tags.values()]
    for report in reports:
        views += report.data.tags.values()
    for view in views:
        assert not SIGNIFICANCE.search(view), SIGNIFICANCE.search(view)

    again = study(tmp_path, "--preset", "seed_note_audit", "--quick")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "10 sweep(s), 10 stored already" in again.stderr
    assert "final run(s) to train" in again.stderr and " 0 final run(s) to train" in again.stderr
    assert not [
        line
        for line in again.stderr.splitlines()
        if "final run(s) to train" in line and not line.split(": ")[1].startswith("0 ")
    ]
