"""``parallel=stacked``: the trials of a batch trained as one stacked model, each its own
Optuna trial and MLflow run.

A sweep asks its trials in batches of ``hydra.sweeper.n_jobs`` (``parallel.workers``) and hands
each batch to its launcher. This one runs each job in two halves. First every job goes through
Hydra's ``run_job`` as the basic launcher runs it (its config composed, its output directory and
``.hydra/`` files written, its logging set up), but with a task that only prepares the trial:
the config checked, the model seeded, the MLflow run's name, tags and description taken from the
job (``experiment.prepare_run``), the pruner's reporting opened. Then the prepared trials that
can train together (``per_model.stack_key``: equal but for the values the sampler chose for the
optimizer) are trained as one stacked model (``experiment.train``), each with its own
hyperparameters, data order, pruner and MLflow run, and each job's return value is what
train.py's would have been (an ``Outcome``, gradalign.sweep.trial). A trial whose preparation
raised is FAILED alone; an error while a group trains fails that group's trials.

The training half runs after every job's Hydra context has ended, so its log lines go to the
sweep's console and log, not to each job's own ``<job>.log``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import (
    JobReturn,
    JobStatus,
    configure_log,
    filter_overrides,
    run_job,
    setup_globals,
)
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict

from gradalign.config import validate
from gradalign.experiment import PreparedRun, prepare_process, prepare_run, train
from gradalign.per_model import stack_key
from gradalign.sweep.trial import log_outcome, outcome_of_history, trial_options

log = logging.getLogger(__name__)


def _process_key(cfg: DictConfig) -> str:
    """What ``prepare_process`` depends on: the data set, the device and the threads."""
    settings = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("dataset", "trainer")}
    settings["trainer"] = {k: settings["trainer"].get(k) for k in ("device", "threads")}
    return json.dumps(settings, sort_keys=True, default=str)


def _prepare_trial(cfg: DictConfig, processes: dict[str, Any]) -> PreparedRun:
    """The task each job runs in its Hydra context: the trial prepared, not trained."""
    validate(cfg)
    key = _process_key(cfg)
    if key not in processes:
        processes[key] = prepare_process(cfg)
    _, splits = processes[key]
    return prepare_run(cfg, splits, **trial_options(cfg))


def launch(
    hydra_context: HydraContext,
    config: DictConfig,
    job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int,
    processes: dict[str, Any],
) -> list[JobReturn]:
    """Prepare every job of the batch, train them in stacked groups, and return their
    JobReturns in order (see the module docstring); ``processes`` keeps the (device, splits) of
    each data set across batches."""
    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    log.info("Launching %d jobs as stacked models", len(job_overrides))
    returns = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = str(idx)  # JobConf.id is a str (OmegaConf 2.4 warns)
            sweep_config.hydra.job.num = idx
        returns.append(
            run_job(
                hydra_context=hydra_context,
                task_function=lambda cfg: _prepare_trial(cfg, processes),
                config=sweep_config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        )
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    groups: dict[tuple[str, str], list[JobReturn]] = {}
    for job in returns:
        if job.status == JobStatus.COMPLETED:
            cfg = job.return_value.cfg
            groups.setdefault((_process_key(cfg), stack_key(cfg)), []).append(job)
    for (key, _), jobs in groups.items():
        _train_group(jobs, *processes[key], several=len(returns) > 1)
    return returns


def _train_group(jobs: Sequence[JobReturn], device: Any, splits: Any, several: bool) -> None:
    """Train the prepared trials of ``jobs`` together and set each job's outcome; ``several``:
    the batch had more jobs than this group (a lone job says why it trains alone)."""
    runs = [job.return_value for job in jobs]
    numbers = [job.hydra_cfg.hydra.job.num for job in jobs]
    if len(runs) > 1:
        log.info("training jobs %s as one stacked model", numbers)
    elif several:
        log.info(
            "training job %s alone: its config differs from the others' in more than stacked "
            "models may (gradalign.per_model)",
            numbers[0],
        )
    try:
        results = train(runs, splits, device)
    except Exception as error:
        for job in jobs:
            job.return_value, job.status = error, JobStatus.FAILED
        return
    for job, run, (history, run_id) in zip(jobs, runs, results, strict=True):
        job.return_value = outcome_of_history(history, run.cfg.objective)
        log_outcome(run.cfg, job.return_value, run_id)
