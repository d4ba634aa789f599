"""A whole study in one command: the Optuna sweeps it needs, its final runs, its report.

    python study.py                           # adam vs gao: 30-trial sweeps, 5 seeds x 100 epochs
    python study.py --quick                   # the same pipeline in seconds (own MLflow experiment)
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

import argparse
import sys
from pathlib import Path

from gradalign.report.cli import run_command
from gradalign.report.settings import (
    add_report_arguments,
    available_parallel,
    available_pruners,
    study_settings_from_args,
)
from gradalign.report.study import run_study

ROOT = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="default", help="conf/study/<name>.yaml")
    parser.add_argument(
        "--suite", action="store_const", const="suite", dest="preset", help="= --preset suite"
    )
    parser.add_argument("--quick", action="store_true", help="the preset's quick budgets")
    parser.add_argument("--trials", type=int, metavar="N", help="Optuna trials per sweep")
    parser.add_argument(
        "--pruner",
        choices=available_pruners(ROOT),
        help="the sweeps' trial pruner, hydra/sweeper/pruner (default: the preset's key pruner; "
        "none, every trial training its budget, unless the preset says otherwise)",
    )
    parser.add_argument(
        "--parallel",
        choices=available_parallel(ROOT),
        help="how each sweep runs its trials, conf/parallel/ (default: the preset's key parallel; "
        "stacked: each batch of trials as one stacked model)",
    )
    add_report_arguments(parser)
    return run_command(argv, parser, study_settings_from_args, run_study, ROOT, "study.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
