"""Sweeps (``python train.py -m``): hydra-optuna-sweeper's loop with gradalign's safeguards
(``sweeper``), a TPE sampler that resumes without repeating itself (``sampler``), and a sweep's
records in MLflow (``runs``). Hydra reaches the sweeper through the plugin shim in
``hydra_plugins.gradalign_sweeper``."""
