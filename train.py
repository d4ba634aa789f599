"""Train one configuration, tracked in MLflow; with -m, run the optimizer's Optuna sweep.

    python train.py                                   # defaults: mnist1d, residual MLP, Adam
    python train.py optimizer=gao optimizer.beta=0.9 trainer.epochs=100 seed.model=3
    python train.py optimizer=gao -m                  # 30-trial TPE study of GAO's lr and beta
    python train.py optimizer=gao -m parallel=joblib  # the same, two trials at a time

Failed trials, deliberately in two kinds:

- A fit that diverges has objective inf. Divergence is a property of the hyperparameters (the
  same config and seeds diverge again), and TPE must learn from it: Optuna's TPE learns only from
  COMPLETE (and PRUNED) trials, so a diverged trial is COMPLETE with value inf, ranked below every
  finite one, and the sampler moves away from the region. It is still visibly a failure: the
  MLflow run ends FAILED with tags failure_reason and diverged=true, and the trial has user attrs
  diverged and failure_reason (gradalign.sweep.trial).
- A trial that raises (a bug, memory, a store that went away) says nothing about its
  hyperparameters: the MLflow run ends FAILED with the exception as failure_reason, the Optuna
  trial is FAIL with the same user attr, TPE ignores it, and the sweep goes on until more than
  hydra.sweeper.max_failure_rate of its n_trials have failed.

A sweep with a pruner (hydra/sweeper/pruner=median, ...) has each trial report its objective so
far after every epoch and stop when the pruner says so: a result, not a failure. Its MLflow run
ends FINISHED with tags pruned=true and pruned_epoch, its Optuna trial PRUNED.

Bad settings (config values, search-space keys, an unreachable tracking server) fail before the
first trial, not once per trial. Ctrl-C or SIGTERM ends the open MLflow run KILLED, with the
sweep's parent, after flushing what it logged; a stored study resumes with the same command.
"""

import sys
from pathlib import Path

from gradalign import processes

processes.adopt()  # first: this process stops if the process that started it is gone

import hydra  # noqa: E402 (after the line above, on purpose)
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from gradalign.checks import UserError  # noqa: E402
from gradalign.config import (  # noqa: E402
    discard_output_dir,
    register_resolvers,
    validate,
)
from gradalign.credentials import mask, mask_logs  # noqa: E402
from gradalign.hydra_compat import VERSION_BASE  # noqa: E402

register_resolvers(Path(__file__).resolve().parent)


@hydra.main(config_path="conf", config_name="config", **VERSION_BASE)
def main(cfg: DictConfig) -> object:
    """Run the composed experiment (see the module docstring): in a sweep, one trial, whose
    outcome (gradalign.sweep.trial.Outcome) goes back to the sweep; alone, one run, whose
    objective is returned."""
    mask_logs()  # no password of a store URL in this job's log (Hydra configured it just now)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        from gradalign.sweep.trial import run_trial

        return run_trial(cfg)  # the sweep records every outcome, raised ones included
    try:
        validate(cfg)  # before torch and MLflow are imported: a bad value answers at once
        from gradalign.experiment import run_experiment

        history, run_id = run_experiment(cfg)
    except BaseException as error:
        status = _exit_status(error)
        if status is None:
            raise
        if getattr(error, "mlflow_run_id", None) is None:  # refused: nothing ran, nothing kept
            discard_output_dir(Path(HydraConfig.get().runtime.output_dir))
        sys.exit(status)
    from gradalign.sweep.trial import log_outcome, outcome_of_history

    outcome = outcome_of_history(history, cfg.objective)
    log_outcome(cfg, outcome, run_id)
    if history.diverged:
        sys.exit(
            _say(f"diverged: {history.reason}; MLflow run {run_id} FAILED", processes.EXIT_DIVERGED)
        )
    return outcome.value


def _exit_status(error: BaseException) -> int | None:
    """Print the one line of a single run that ended with ``error`` (a setting or store to fix,
    an interruption) and return its exit status; None for any other error, which propagates."""
    # Terminated exists only once MLflow is imported, which a config error precedes.
    tracking = sys.modules.get("gradalign.tracking")
    stopped = (KeyboardInterrupt, tracking.Terminated) if tracking else (KeyboardInterrupt,)
    if isinstance(error, UserError):  # a bad value (ConfigError), a store to fix
        return _say(f"error: {mask(str(error))}", processes.EXIT_BAD_INPUT)
    if isinstance(error, stopped):
        run = getattr(error, "mlflow_run_id", None)
        where = f"MLflow run {run} marked KILLED" if run else "no MLflow run was opened"
        return _say(
            f"interrupted: {where}; run the same command to train again", processes.EXIT_INTERRUPTED
        )
    return None


def _say(line: str, status: int) -> int:
    print(line, file=sys.stderr)
    return status


if __name__ == "__main__":
    main()
