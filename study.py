"""The whole seed study in one command: an Optuna sweep per optimizer, then the report.

    python study.py                          # adam and gao: 30-trial sweeps, 5 seeds x 100 epochs
    python study.py --quick                  # the same pipeline in seconds (own MLflow experiment)
    python study.py --optimizers adam gao gao_update -- model=cnn

Flags and defaults: conf/study.yaml (sweeps), conf/report.yaml (report). Overrides after `--`
go to every sweep and to the report's final runs.
"""

import argparse
import sys
from pathlib import Path

from gradalign.report.cli import run_command
from gradalign.report.settings import add_report_arguments, study_settings_from_args
from gradalign.report.study import run_study

ROOT = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="conf/study.yaml's quick preset")
    parser.add_argument("--trials", type=int, metavar="N", help="Optuna trials per optimizer")
    add_report_arguments(parser)
    return run_command(argv, parser, study_settings_from_args, run_study, ROOT, "study.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
