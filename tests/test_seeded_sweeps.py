"""What the sweep loop must never change: a seeded sweep's trials. Recorded (tests/fixtures/
seeded_sweeps.json) from hydra-optuna-sweeper 1.3.0's loop before gradalign's own loop replaced
it: the same command must ask the same values in the same order (TPE's seeded start-up and the
TPE trials after it), train them to the same objectives, and a stacked sweep must ask what it
asked then. The study names study.py stores its sweeps under must not change either (a rerun
resumes them)."""

import json
from pathlib import Path

import optuna
import pytest
from helpers import train_in_process
from test_study import parse

from gradalign.report.study import part_settings, sweep_of

FIXTURE = Path(__file__).parent / "fixtures" / "seeded_sweeps.json"
# name -> the sweep's overrides; 12 serial trials: TPE's 10 random start-up trials and 2 after
SWEEPS = {
    "adam": ["optimizer=adam", "hydra.sweeper.n_trials=12"],
    "gao": ["optimizer=gao", "hydra.sweeper.n_trials=12"],
    "gao-stacked": [
        "optimizer=gao",
        "parallel=stacked",
        "parallel.workers=3",
        "hydra.sweeper.n_trials=6",
    ],
}


def seeded_sweep(monkeypatch, tmp_path, tiny, name):
    """Run sweep ``name`` of SWEEPS (1 epoch on 1000 samples, sampler seed 0) into stores of its
    own; its trials as [number, state, params, value]."""
    storage = f"sqlite:///{tmp_path / f'{name}.db'}"
    code = train_in_process(
        monkeypatch,
        "-m",
        *SWEEPS[name],
        *tiny,
        "trainer.epochs=1",
        "hydra.sweeper.seed=0",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=s",
        f"hydra.sweep.dir={tmp_path / name}",
        f"tracking.uri=sqlite:///{tmp_path / f'{name}-mlflow.db'}",
    )
    assert code == 0
    study = optuna.load_study(study_name="s", storage=storage)
    return [[t.number, t.state.name, t.params, t.value] for t in study.trials]


@pytest.mark.parametrize("name", list(SWEEPS))
def test_a_seeded_sweep_asks_and_finds_what_it_did_before_the_loop_was_replaced(
    monkeypatch, tmp_path, tiny, name
):
    expected = json.loads(FIXTURE.read_text())["sweeps"][name]
    found = seeded_sweep(monkeypatch, tmp_path, tiny, name)
    assert [t[:3] for t in found] == [t[:3] for t in expected]  # the values exactly
    assert [t[3] for t in found] == pytest.approx([t[3] for t in expected], rel=1e-6)


def test_the_studies_study_py_stores_keep_their_names():
    expected = json.loads(FIXTURE.read_text())["study_names"]
    assert study_names(expected) == expected


def study_names(presets):
    """preset -> the names of the Optuna studies its sweeps are stored under."""
    found = {}
    for preset in presets:
        settings = parse("--preset", preset)
        for part in settings.parts:
            report = part_settings(settings, part, "x")
            for optimizer in report.optimizers:
                sweep = sweep_of(report, optimizer, part, settings.pruner, settings.parallel)
                found.setdefault(preset, []).append(sweep.study_name)
    return found
