"""Sweeps (``python train.py -m``): gradalign's own Optuna loop, which owns each trial from ask
to record (``sweeper``; one trial in both stores: ``trial``), behind hydra-optuna-sweeper's
settings. Hydra reaches it through the plugin shim in ``hydra_plugins.gradalign_sweeper``."""
