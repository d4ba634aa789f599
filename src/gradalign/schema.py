"""The MLflow contract: the names every writer and reader of the tracking store agrees on.

A run's stage, its tag keys and its metric keys are spelled here once. The writers
(gradalign.tracking, gradalign.records, gradalign.sweep, gradalign.report.build) and the
readers (gradalign.report.runs, the tests, a user's own queries) import them, so renaming one is
one edit and cannot silently break a reader. docs/tracking.md describes the same schema for
people.
"""

from __future__ import annotations

from typing import Final


class Stage:
    """Values of the ``stage`` tag: what a run is."""

    SINGLE: Final = "single"  # python train.py
    SWEEP: Final = "sweep"  # one trial of python train.py -m
    SWEEP_PARENT: Final = "sweep_parent"  # the run the trials of one sweep (or study) nest under
    FINAL: Final = "final"  # a report's retraining of a selected configuration for one seed
    REPORT: Final = "report"  # the report itself; its final runs nest under it
    STUDY: Final = "study"  # a study of several comparisons (an audit); their reports nest under it


class Tag:
    """Tag keys."""

    STAGE: Final = "stage"
    OPTIMIZER: Final = "optimizer"  # the optimizer config's name (adam, gao, ...)
    SCHEDULER: Final = "scheduler"  # the lr scheduler config's name (none, cosine, warmup)
    CONFIG_HASH: Final = "config_hash"  # what a run computes, without seeds, paths, tracking
    INIT_HASH: Final = "init_hash"  # the model's initial weights
    GIT_COMMIT: Final = "git_commit"
    GIT_DIRTY: Final = "git_dirty"
    OWNER: Final = "owner"  # host:pid:start time of the process that opened the run
    OWNER_PREFIX: Final = "owner."  # a sweep parent: owner.<host>.<pid> per sweep process in it
    FAILURE_REASON: Final = "failure_reason"  # FAILED and KILLED runs: why
    DIVERGED: Final = "diverged"  # "true" on a run whose fit diverged
    PRUNED: Final = "pruned"  # "true" on a sweep run its Optuna pruner stopped (FINISHED)
    PRUNED_EPOCH: Final = "pruned_epoch"  # a pruned run: the last epoch it trained
    HYDRA_JOB_NUM: Final = "hydra_job_num"
    SWEEP_ID: Final = "sweep_id"  # the key of the sweep's parent run
    SWEEP_DIR: Final = "sweep_dir"  # the sweep process's output directory
    OPTUNA_STUDY: Final = "optuna_study"
    STUDY_KEY: Final = "optuna_study_key"  # a sweep parent: the key of its Optuna study
    OPTUNA_TRIAL: Final = "optuna_trial"  # the trial's number in its Optuna study
    SELECTED_FROM: Final = "selected_from"  # a final run: the sweep run it retrains
    VALIDATION: Final = "validation"  # what the val metrics were computed on (values below)
    OPTIMIZERS: Final = "optimizers"  # a report: the optimizers it compares, comma-separated
    REPORT_NAME: Final = "report_name"  # a report: its folder's name (--name), to resume it
    VERDICT_PREFIX: Final = "verdict/"  # a report: verdict/<optimizer>
    SMOKE_RUN: Final = "smoke_run"  # "true" on a report or study whose numbers make no verdict
    CI_PREFIX: Final = "ci/"  # a report: ci/<optimizer>, the verdict's interval, "[lo, hi] (95%)"
    # a final run: reported_in/<report name> = the run id of each report that used it (a final
    # run is reused by later reports, and nests under the first one only)
    REPORTED_IN_PREFIX: Final = "reported_in/"
    # a sweep parent, once trials have ended (see Metric.BEST_OBJECTIVE)
    BEST_RUN_ID: Final = "best_run_id"  # the MLflow run of the study's best trial
    BEST_TRIAL: Final = "best_trial"  # its Optuna trial number
    BEST_PREFIX: Final = "best."  # best.<searched key>, e.g. best.optimizer.lr: its value


VALIDATION_CARVED: Final = "carved from train"
VALIDATION_ON_TEST: Final = "test split (selection sees the test set)"


class Metric:
    """Metric keys. Per-epoch metrics are logged with step = epoch (1-based); summary metrics
    with step 0.

    MLflow's run page puts the charts of keys with a ``section/`` prefix first, sections in
    sorted order, then the unprefixed ones; the per-epoch curves are prefixed so that they lead
    (accuracy, loss, then GAO's per-parameter scales) and the step-0 summaries come last.
    """

    TRAIN_LOSS: Final = "loss/train"
    VAL_LOSS: Final = "loss/val"
    VAL_ACC: Final = "accuracy/val"
    TEST_LOSS: Final = "loss/test"
    TEST_ACC: Final = "accuracy/test"
    EPOCH_TIME: Final = "epoch_time"
    LR: Final = "lr"  # with a scheduler: the lr the epoch trained with
    ALIGNMENT_PREFIX: Final = "scale/"  # scale/<parameter name>: GAO's mean alignment scale
    # What the epoch engine (gradalign.training) computes for every epoch and a run logs (with
    # the scales of an optimizer exposing last_scales); docs/tracking.md has a line for each.
    PER_EPOCH: Final = (TRAIN_LOSS, VAL_LOSS, VAL_ACC, TEST_LOSS, TEST_ACC, EPOCH_TIME)
    # The keys of runs logged before the per-epoch metrics were renamed (readers fall back to
    # them): new key -> old key, and the old prefix of the scales.
    LEGACY: Final = {
        "loss/train": "train_loss",
        "loss/val": "val_loss",
        "accuracy/val": "val_acc",
        "loss/test": "test_loss",
        "accuracy/test": "test_acc",
    }
    LEGACY_ALIGNMENT_PREFIX: Final = "alignment/"
    OBJECTIVE: Final = "objective"  # the value a sweep optimises
    BEST_VAL_LOSS: Final = "best_val_loss"
    BEST_EPOCH: Final = "best_epoch"
    # A sweep parent: its study's trials by outcome (summaries), and per trial (step = the trial
    # number) the trial's objective and the best one so far, whose latest value is the study's
    # best. Not called objective, so that sorting runs by objective ranks trials only.
    TRIAL_OBJECTIVE: Final = "trial_objective"
    BEST_OBJECTIVE: Final = "best_objective"
    TRIALS_COMPLETE: Final = "trials_complete"  # finished with a finite objective
    TRIALS_DIVERGED: Final = "trials_diverged"  # finished, objective inf (the fit diverged)
    TRIALS_FAILED: Final = "trials_failed"  # raised, or were interrupted
    TRIALS_PRUNED: Final = "trials_pruned"
    # A report run's comparison <optimizer>/<outcome>/<this>: the p its verdict rests on
    # (gradalign.report.stats.PairedTest.p), the one the Reports view shows.
    DECIDING_P: Final = "p_t"


class MlflowTag:
    """MLflow's own tag keys that the pipeline writes, so that MLflow's UI fills its columns
    (Source, Description, the run's Git commit) and opens views the pipeline prepares
    (mlflow.utils.mlflow_tags has the same names; tests check they agree)."""

    NOTE: Final = "mlflow.note.content"  # a run's or an experiment's description (markdown)
    PARENT_RUN_ID: Final = "mlflow.parentRunId"
    RUN_NAME: Final = "mlflow.runName"  # set as a tag, it renames the run
    SOURCE_TYPE: Final = "mlflow.source.type"
    SOURCE_NAME: Final = "mlflow.source.name"  # the Source column: the entry point script
    GIT_COMMIT: Final = "mlflow.source.git.commit"
    GIT_BRANCH: Final = "mlflow.source.git.branch"
    GIT_REPO_URL: Final = "mlflow.source.git.repoURL"
    GIT_DIRTY: Final = "mlflow.source.git.dirty"
    USER: Final = "mlflow.user"
    # experiment tags
    EXPERIMENT_KIND: Final = "mlflow.experimentKind"  # what kind of work the experiment holds
    SHARED_VIEW_PREFIX: Final = "mlflow.sharedViewState."  # <key>: a saved runs-table view
    DATA_CONTEXT: Final = "mlflow.data.context"  # a dataset input's tag: what the run used it for


class Param:
    """Param key prefixes: a run's params are its resolved config, flattened with dots."""

    OPTIMIZER_PREFIX: Final = "optimizer."
    SWEEPER_PREFIX: Final = "sweeper."  # a sweep parent's params: the sweeper's settings
    REPORT_PREFIX: Final = "report."  # a report run's params: its settings
