"""Clean up after processes that were killed outright: ``python -m gradalign.doctor``.

A process killed with SIGKILL (``kill -9``, the OOM killer, a lost machine) cannot end what it
had open: its MLflow runs stay RUNNING, a sweep parent it owned stays RUNNING, and the Optuna
trials it was running stay RUNNING in their study. Every run records its owner (tag ``owner``:
host, pid and start time of its process; sweep parents one ``owner.<host>.<pid>`` tag per sweep
process), and every trial its sweep process (user attr ``owner``). The doctor finds those whose
owner is gone, on this host, and ends them: runs KILLED, with a failure_reason saying so; then
each trial takes the outcome its MLflow run records (gradalign.sweep.trial.settle): a run that
finished with an objective makes its trial COMPLETE with that value, a pruned one PRUNED, a
diverged one COMPLETE with inf, a killed or failed one FAIL. A resumed sweep does the same for
its own study. Owners on other hosts, and runs without an owner, are listed and left alone.

    python -m gradalign.doctor                 # the configured MLflow store and its studies
    python -m gradalign.doctor --dry-run       # say what would be done, do nothing
    python -m gradalign.doctor --storage sqlite:///outputs/optuna.db -- tracking.uri=...

The sweep parents name their studies' storages, with any password masked: pass such a storage
with ``--storage URL`` (its full URL) for the doctor to reach it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import optuna
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from optuna.trial import TrialState

from gradalign import processes, tracking
from gradalign.budget import OWNER
from gradalign.config import anchored_uri, checkout_config, repo_root
from gradalign.credentials import MASK, mask
from gradalign.optuna_storage import open_storage
from gradalign.schema import Param, Stage, Tag
from gradalign.sweep.runs import trial_run_finder
from gradalign.sweep.trial import COMPLETE, DIVERGED, FAILED, PRUNED, settle

log = logging.getLogger(__name__)
REASON = "its process {owner} is gone (ended by python -m gradalign.doctor)"
STATES = {COMPLETE: "COMPLETE", DIVERGED: "COMPLETE", PRUNED: "PRUNED", FAILED: "FAIL"}


def _dead(owner: str | None) -> bool:
    return bool(owner) and processes.owner_alive(owner) is False


def clean_runs(client, experiment_ids: Sequence[str], dry_run: bool) -> tuple[list[str], set[str]]:
    """End KILLED the RUNNING runs whose owner process is gone; (lines saying what was done,
    the Optuna storages the experiments' sweep parents name)."""
    done, storages = [], set()
    for run in client.search_runs(
        list(experiment_ids), "", ViewType.ACTIVE_ONLY, max_results=50000
    ):
        tags, params = run.data.tags, run.data.params
        storage = params.get(f"{Param.SWEEPER_PREFIX}storage")
        if storage and storage != "None":
            storages.add(storage)
        if run.info.status != "RUNNING":
            continue
        if tags.get(Tag.STAGE) == Stage.SWEEP_PARENT:
            owners = [v for k, v in tags.items() if k.startswith(Tag.OWNER_PREFIX)]
            if not owners or not all(_dead(owner) for owner in owners):
                continue
            owner = ", ".join(owners)
        else:
            owner = tags.get(Tag.OWNER)
            if not _dead(owner):
                if not owner:
                    done.append(f"left alone: run {run.info.run_id} is RUNNING with no owner tag")
                continue
        done.append(f"run {run.info.run_id} ({tags.get('mlflow.runName', '')}) -> KILLED")
        if not dry_run:
            client.set_tag(run.info.run_id, Tag.FAILURE_REASON, REASON.format(owner=owner))
            client.set_terminated(run.info.run_id, "KILLED")
    return done, storages


def clean_trials(
    storage: str, client: MlflowClient, tracking_cfg: DictConfig, dry_run: bool
) -> list[str]:
    """Complete from MLflow the RUNNING trials of every study in ``storage`` whose sweep process
    is gone (their runs in the configured MLflow store, ``client``'s)."""
    done = []
    opened = open_storage(storage, tracking_cfg.store_wait_s)
    for summary in optuna.get_all_study_summaries(opened):
        study = optuna.load_study(study_name=summary.study_name, storage=opened)
        gone = [
            trial
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if _dead(trial.user_attrs.get(OWNER))
        ]
        if not gone:
            continue
        # connected only if a trial needs a search: connect creates the experiment
        find = trial_run_finder(
            lambda: tracking.connect(tracking_cfg), f"optuna:{summary.study_name}"
        )
        outcomes = settle(study, opened, gone, client, find, dry_run=dry_run)
        for number, outcome in sorted(outcomes.items()):
            state = STATES[outcome.kind]
            value = f" {outcome.value:.4g}" if outcome.value is not None else ""
            done.append(
                f"trial {number} of study {summary.study_name} -> {state}{value} "
                "(from its MLflow run)"
            )
    return done


def storages_to_clean(recorded: Iterable[str], given: Iterable[str], root: Path) -> list[str]:
    """The Optuna storages to visit: those given, and those recorded in MLflow that none of the
    given ones is (recorded ones have their password masked, so a masked one only counts through
    a given one)."""
    given = {anchored_uri(url, root) for url in given}
    recorded = {anchored_uri(url, root) for url in recorded} - {mask(url) for url in given}
    return sorted(given | recorded)


def main(argv: Iterable[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="say what would be done only")
    parser.add_argument(
        "--storage", action="append", default=[], metavar="URL", help="an Optuna storage"
    )
    parser.add_argument("overrides", nargs="*", help="after --: config overrides (tracking.*)")
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        root = repo_root()
        cfg = checkout_config(args.overrides)
        uri = tracking.tracking_uri(cfg.tracking)
        client = tracking.client(uri, cfg.tracking.store_wait_s)
        experiments = [e.experiment_id for e in client.search_experiments()]
        lines, storages = clean_runs(client, experiments, args.dry_run)
        for storage in storages_to_clean(storages, args.storage, root):
            if f":{MASK}@" in storage:
                lines.append(f"skipped Optuna storage {storage}: pass it with --storage URL")
                continue
            try:
                lines += clean_trials(storage, client, cfg.tracking, args.dry_run)
            except Exception as error:  # a storage that moved or went away: say so, go on
                lines.append(f"skipped Optuna storage {mask(storage)}: {mask(str(error))}")
    except (ValueError, tracking.TrackingUnavailable) as error:
        print(f"error: {mask(str(error))}", file=sys.stderr)
        return 2
    verb = "would end" if args.dry_run else "ended"
    changed = [line for line in lines if "->" in line]
    gone = f"{verb} {len(changed)} record(s) left by processes that are gone"
    print(f"MLflow store {mask(uri)}: {gone}")
    for line in lines:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
