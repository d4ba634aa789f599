"""What differs between Hydra 1.3 (the pinned set, requirements.txt) and Hydra 1.4 (its release
candidates, requirements-hydra14.txt: ``make test-hydra14``), in one place, so that the rest of
the code reads the same on both.

- ``version_base``: Hydra 1.3 needs ``"1.3"`` (without it, Hydra 1.1's defaults and a warning);
  Hydra 1.4 only records it, deprecates it, and Hydra 1.5 removes it. ``VERSION_BASE`` is the
  argument to pass to ``hydra.main`` and ``initialize_config_dir``: ``"1.3"`` on 1.3, none on 1.4.
- The execution whitelist: Hydra 1.4 warns (and Hydra 1.5 refuses) when ``instantiate`` resolves
  a config's ``_target_`` without a whitelist of trusted targets from the calling code. Every
  ``instantiate`` of gradalign passes ``**trusted()`` (``_execution_whitelist_`` on 1.4; nothing
  on 1.3, whose ``instantiate`` would pass it to the target as an argument).
- Resolvers: OmegaConf 2.4 renames ``register_new_resolver`` to ``register_resolver`` (2.3's
  ``register_resolver`` is the legacy one, with other semantics): ``register_resolver``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import OmegaConf

HYDRA_14 = tuple(int(part) for part in hydra.__version__.split(".")[:2]) >= (1, 4)

VERSION_BASE: dict[str, str] = {} if HYDRA_14 else {"version_base": "1.3"}

# The packages whose classes and functions a config's _target_ may name: gradalign's components,
# torch's optimizers, pytorch_optimizer's (conf/optimizer's lion, adopt, lookahead), Optuna's
# samplers and pruners and hydra-optuna-sweeper's sampler factories (hydra/sweeper/sampler=...).
# A component from another package (an optimizer of another library) adds its package here.
TRUSTED_TARGETS = (
    "gradalign.*",
    "torch.optim.*",
    "pytorch_optimizer.*",
    "optuna.samplers.*",
    "optuna.pruners.*",
    "hydra_plugins.hydra_optuna_sweeper.*",
)


def trusted(*targets: str) -> dict[str, Any]:
    """``instantiate``'s keyword arguments that let it resolve TRUSTED_TARGETS and ``targets``
    (exact names, or packages as ``package.*``)."""
    return {"_execution_whitelist_": (*TRUSTED_TARGETS, *targets)} if HYDRA_14 else {}


_RENAMED = "replace" in inspect.signature(OmegaConf.register_resolver).parameters


def register_resolver(name: str, resolver: Callable[..., Any]) -> None:
    """Register (or replace) the OmegaConf resolver ``${name:...}``."""
    register = OmegaConf.register_resolver if _RENAMED else OmegaConf.register_new_resolver
    register(name, resolver, replace=True)
