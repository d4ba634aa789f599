"""study.py: its settings (the quick preset, flags and overrides), the sweep commands it runs,
a failing sweep's error, and (slow) the quick study end to end in a subprocess."""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from gradalign.report.settings import add_report_arguments, study_settings_from_args
from gradalign.report.study import run_sweeps, sweep_commands, trials_left

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse(*argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--trials", type=int)
    add_report_arguments(parser)
    return study_settings_from_args(REPO_ROOT, parser.parse_args(argv), "cmd")


def test_quick_preset_then_flags_then_user_overrides():
    full = parse()
    assert (full.trials, full.report.final_epochs, len(full.report.seeds)) == (30, 100, 5)
    assert full.report.overrides == ()
    quick = parse("--quick", "--optimizers", "adam", "gao", "gao_update", "--", "model=cnn")
    assert quick.trials == 3 and quick.report.seeds == (1, 2)
    assert quick.report.optimizers == ("adam", "gao", "gao_update")
    assert quick.report.overrides[0] == "tracking.experiment=gradient-alignment-quick"
    assert quick.report.overrides[-1] == "model=cnn"  # the user's come last: they win
    assert parse("--quick", "--trials", "5", "--seeds", "7", "8").trials == 5
    with pytest.raises(ValueError, match="trials=0"):
        parse("--trials", "0")


def test_sweep_commands_are_train_py_multiruns_in_their_own_folders(tmp_path):
    settings = parse("--quick", "--", "model=cnn")
    root = tmp_path / "runs, 'best' (1)"  # a comma or bracket unquoted breaks a Hydra override
    commands = sweep_commands(settings, root, {"adam": 3, "gao": 2})
    assert set(commands) == {"adam", "gao"}
    gao = commands["gao"]
    assert gao[:4] == [sys.executable, str(REPO_ROOT / "train.py"), "-m", "optimizer=gao"]
    assert "model=cnn" in gao and "hydra.sweeper.n_trials=2" in gao
    assert f"hydra.sweeper.study_name={root.name}-gao" in gao
    parsed = {
        o.key_or_group: o.value()
        for o in OverridesParser.create().parse_overrides(
            [a for a in gao if a.startswith(("hydra.sweep.dir=", "hydra.sweeper.storage="))]
        )
    }
    assert parsed["hydra.sweep.dir"] == str(root / "gao")  # its own folder: never two in one
    assert parsed["hydra.sweeper.storage"] == f"sqlite:///{root / 'optuna.db'}"  # resumable
    assert set(sweep_commands(settings, root, {"adam": 0, "gao": 1})) == {"gao"}  # adam is done


def test_trials_left_counts_the_completed_trials_of_each_stored_study(tmp_path):
    assert trials_left(tmp_path, ["adam", "gao"], 5) == {"adam": 5, "gao": 5}
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name=f"{tmp_path.name}-gao", storage=storage)
    for value in (1.0, 2.0):
        study.tell(study.ask(), value)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)  # does not count
    study.ask()  # RUNNING (a killed sweep's): does not count
    assert trials_left(tmp_path, ["adam", "gao"], 5) == {"adam": 5, "gao": 3}
    assert trials_left(tmp_path, ["gao"], 2) == {"gao": 0}


def test_a_failing_sweep_stops_the_others_and_shows_its_log(tmp_path):
    commands = {
        "ok": [sys.executable, "-c", "import time; time.sleep(30)"],
        "bad": [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
    }
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"(?s)sweep of bad failed \(exit 3\).*boom"):
        run_sweeps(commands, tmp_path, jobs=2)
    assert time.perf_counter() - start < 20  # "ok" was stopped, not waited for
    assert (tmp_path / "bad.log").read_text().strip() == "boom"


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    command = [
        sys.executable,
        "study.py",
        "--quick",
        "--name",
        "t",
        "--",
        f"paths.outputs={tmp_path / 'out'}",
    ]
    start = time.perf_counter()
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    report = tmp_path / "out" / "report" / "t"
    assert done.stdout.strip() == str(report / "report.md")
    text = (report / "report.md").read_text()
    assert "| adam |" in text and "| gao |" in text and "## Verdict" in text
    assert (report / "convergence_comparison.png").stat().st_size > 10_000
    print(f"quick study: {elapsed:.1f} s")

    again = subprocess.run(
        [*command[:4], "t2", *command[5:]],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 final run(s) to train, 4 reused" in again.stderr

    taken = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert taken.returncode == 2 and "choose another --name" in taken.stderr
    assert "started" not in taken.stderr  # refused before any sweep started
