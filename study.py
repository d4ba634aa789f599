"""A whole study in one command: the Optuna sweeps it needs, its final runs, its report.

    python study.py                           # adam vs gao: 30-trial sweeps, 5 seeds x 100 epochs
    python study.py --quick                   # the pipeline in seconds: a smoke run, no verdict
    python study.py --preset seed_note        # the research note's own study, as it ran it
    python study.py --preset seed_note_audit  # ... and under variations, claim by claim
    python study.py --suite                   # = --preset suite: adam vs gao on five workloads
    python study.py --optimizers adam gao gao_update -- model=cnn
    python study.py --pruner median           # sweeps whose hopeless trials stop early
    python study.py --parallel serial         # each sweep one trial at a time (default: stacked)

Presets and their keys: conf/study/<name>.yaml (report defaults: conf/report.yaml). Overrides
after `--` go to every sweep and final run. Sweeps are stored (outputs/studies/optuna.db) and
final runs tracked, so a rerun only redoes what is missing.
"""

import sys
from pathlib import Path

from gradalign.report.cli import run_command
from gradalign.report.settings import StudySettings, add_study_arguments, study_settings_from_args

ROOT = Path(__file__).resolve().parent


def study(settings: StudySettings) -> Path:
    """Run the study; its page. (torch, MLflow and Optuna are imported here, after the flags
    are read: --help and a bad flag answer at once.)"""
    from gradalign.report.study import run_study

    return run_study(settings)


def main(argv: list[str]) -> int:
    return run_command(
        argv, __doc__, add_study_arguments, study_settings_from_args, study, ROOT, "study.py"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
