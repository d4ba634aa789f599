"""Train one configuration, tracked in MLflow; with -m, run the optimizer's Optuna sweep.

    python train.py                                   # defaults: mnist1d, residual MLP, Adam
    python train.py optimizer=gao optimizer.beta=0.9 trainer.epochs=100 seed.model=3
    python train.py optimizer=gao -m                  # 30-trial TPE study of GAO's lr and beta

The value returned to the sweeper is the run's objective (cfg.objective of the val loss). A
diverged run returns math.inf: optuna 2.10 stores it as a COMPLETE trial that TPE ranks below
every finite one, so the sampler learns to avoid the diverging region. NaN would not do: optuna
rejects it and hydra-optuna-sweeper 1.3.0 then crashes while marking the trial failed; raising
would mark the trial FAIL, which TPE ignores, and abort the sweep (max_failure_rate is 0). The
MLflow run of a diverged fit ends FAILED with tag failure_reason.
"""

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from gradalign.config import register_resolvers, validate
from gradalign.experiment import run_experiment, sweep_parent_run

register_resolvers(Path(__file__).resolve().parent)
log = logging.getLogger(__name__)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Run the composed experiment and return its objective (see the module docstring)."""
    validate(cfg)  # before a sweep's parent run is created
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep_id, parent_run_id = sweep_parent_run(
            cfg, sweep_dir=Path(hydra_cfg.sweep.dir), sweeper=hydra_cfg.sweeper
        )
        history, run_id = run_experiment(
            cfg,
            stage="sweep",
            parent_run_id=parent_run_id,
            extra_tags={"sweep_id": sweep_id, "hydra_job_num": str(hydra_cfg.job.num)},
        )
    else:
        history, run_id = run_experiment(cfg)
    objective = history.objective(cfg.objective)
    outcome = f"diverged ({history.reason})" if history.diverged else f"objective={objective:.4f}"
    log.info("%s  mlflow run %s", outcome, run_id)
    return objective


if __name__ == "__main__":
    main()
