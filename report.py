"""Compare the optimizers' best sweep runs over several seeds: figure, statistics, verdict.

    python report.py                       # conf/report.yaml: adam vs gao, 5 seeds x 100 epochs
    python report.py --optimizers adam gao gao_update --seeds 1 2 3 4 5 -- model=cnn
    python report.py -- tracking.experiment=gradient-alignment-quick trainer.epochs=3

Needs a finished sweep per optimizer (python train.py optimizer=<name> -m, with the same
overrides). Writes outputs/report/<name>/{report.md,convergence_comparison.png}, also logged to
MLflow; final runs already tracked for the same configuration and seed are reused. With fewer
paired seeds than --min-pairs a comparison is a smoke run: its numbers, no verdict.
"""

import sys
from pathlib import Path

from gradalign.report.cli import run_command
from gradalign.report.settings import (
    ReportSettings,
    add_report_arguments,
    report_settings_from_args,
)

ROOT = Path(__file__).resolve().parent


def report(settings: ReportSettings) -> Path:
    """Write the report; its markdown page. (torch and MLflow are imported here, after the
    flags are read: --help and a bad flag answer at once.)"""
    from gradalign.report.build import MARKDOWN, write_report

    return write_report(settings).out_dir / MARKDOWN


def main(argv: list[str]) -> int:
    return run_command(
        argv, __doc__, add_report_arguments, report_settings_from_args, report, ROOT, "report.py"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
