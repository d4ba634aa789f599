"""The MLflow contract: the names every writer and reader of the tracking store agrees on.

A run's stage, its tag keys and its metric keys are spelled here once. The writers
(gradalign.tracking, gradalign.experiment, gradalign.sweep, gradalign.report.build) and the
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
    OPTUNA_TRIAL: Final = "optuna_trial"  # the trial's number in its Optuna study
    SELECTED_FROM: Final = "selected_from"  # a final run: the sweep run it retrains
    VALIDATION: Final = "validation"  # what the val metrics were computed on (values below)
    OPTIMIZERS: Final = "optimizers"  # a report: the optimizers it compares, comma-separated
    REPORT_NAME: Final = "report_name"  # a report: its folder's name (--name), to resume it
    VERDICT_PREFIX: Final = "verdict/"  # a report: verdict/<optimizer>


VALIDATION_CARVED: Final = "carved from train"
VALIDATION_ON_TEST: Final = "test split (selection sees the test set)"


class Metric:
    """Metric keys. Per-epoch metrics are logged with step = epoch (1-based); summary metrics
    with step 0."""

    TRAIN_LOSS: Final = "train_loss"
    VAL_LOSS: Final = "val_loss"
    VAL_ACC: Final = "val_acc"
    TEST_LOSS: Final = "test_loss"
    TEST_ACC: Final = "test_acc"
    EPOCH_TIME: Final = "epoch_time"
    ALIGNMENT_PREFIX: Final = "alignment/"  # alignment/<parameter name>: GAO's mean scale
    OBJECTIVE: Final = "objective"  # the value a sweep optimises
    BEST_VAL_LOSS: Final = "best_val_loss"
    BEST_EPOCH: Final = "best_epoch"
    # A sweep parent: its Optuna study's trials by state (diverged ones are complete, value inf)
    TRIALS_COMPLETE: Final = "trials_complete"
    TRIALS_PRUNED: Final = "trials_pruned"
    TRIALS_FAILED: Final = "trials_failed"


class Param:
    """Param key prefixes: a run's params are its resolved config, flattened with dots."""

    OPTIMIZER_PREFIX: Final = "optimizer."
    SWEEPER_PREFIX: Final = "sweeper."  # a sweep parent's params: the sweeper's settings
    REPORT_PREFIX: Final = "report."  # a report run's params: its settings
