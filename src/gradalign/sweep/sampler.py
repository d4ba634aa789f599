"""The samplers of gradalign's sweeps: hydra-optuna-sweeper's sampler choices
(``hydra/sweeper/sampler=tpe|random|cmaes|nsgaii|motpe|grid``) built for the installed Optuna,
and a TPE sampler that resumes a stored study without repeating itself.

hydra-optuna-sweeper 1.3.0's sampler configs were written for Optuna 2.10: they pass arguments
current Optuna deprecates (each a FutureWarning) even at their defaults, and name
``MOTPESampler``, which Optuna 4 removed (its TPE samples several objectives itself; 1.4's
motpe config names a function that says so). ``build_sampler`` drops the deprecated arguments
that still hold their defaults, maps motpe to TPE on both, and gives every sampler the sweep's
seed unless its own config sets one (1.4's nsgaii and nsgaiii name factory functions that pass
it on).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

from hydra.utils import get_object, instantiate
from optuna.distributions import BaseDistribution
from optuna.samplers import TPESampler
from optuna.study import Study
from optuna.trial import FrozenTrial

from gradalign.hydra_compat import trusted

log = logging.getLogger(__name__)
_TPE, _CMAES = (f"optuna.samplers.{name}" for name in ("TPESampler", "CmaEsSampler"))
# motpe's target in hydra-optuna-sweeper 1.3 and in 1.4
_MOTPE = (
    "optuna.samplers.MOTPESampler",
    "hydra_plugins.hydra_optuna_sweeper.config.raise_motpe_removed",
)
# Arguments the stock configs always pass that current Optuna deprecates, with the values that
# leave Optuna's behaviour as it is: dropped when they hold those values.
_DEPRECATED_DEFAULTS = {
    _TPE: {
        "consider_prior": True,
        "prior_weight": 1.0,
        "consider_magic_clip": True,
        "consider_endpoints": False,
    },
    _CMAES: {"restart_strategy": None, "inc_popsize": 2},
}


class ResumableTPESampler(TPESampler):
    """TPESampler (same arguments) that continues, not replays, its seed's stream on resume.

    hydra-optuna-sweeper resumes a persisted study (``load_if_exists=True``) but builds a new
    sampler from the same seed, so the resumed process would replay the first process's random
    start-up suggestions: its first trials would duplicate finished ones. This sampler seeds its
    random streams with ``seed + the number of the first trial it samples``: 0 for a new study
    (exactly ``TPESampler(seed)``), the count of trials already in the study for a resumed one.
    """

    def __init__(self, *, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(seed=seed, **kwargs)
        self._seed = seed
        self._offset_pending = seed is not None

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        """Optuna calls this first for every trial; the first call offsets the seed."""
        if self._offset_pending:
            self._offset_pending = False
            # The streams of a TPESampler made with the offset seed, whatever types this Optuna
            # keeps them in.
            fresh = TPESampler(seed=self._seed + trial.number)
            self._rng, self._random_sampler = fresh._rng, fresh._random_sampler
        return super().infer_relative_search_space(study, trial)


def build_sampler(node: Mapping[str, Any], seed: int | None) -> Any:
    """The sampler a ``hydra.sweeper.sampler`` config describes, for the installed Optuna (a
    ``functools.partial`` for the grid sampler, as the stock sweeper expects)."""
    spec = dict(node)
    target = spec.pop("_target_")
    if target in _MOTPE:
        log.info("sampler=motpe: Optuna >= 4 samples several objectives with TPE")
        spec["n_ei_candidates"] = spec.pop("n_ehvi_candidates", 24)
        target = _TPE
    for key, default in _DEPRECATED_DEFAULTS.get(target, {}).items():
        if key in spec and spec[key] == default:
            del spec[key]
    if target == _TPE and not spec.get("multivariate"):
        spec.pop("warn_independent_sampling", None)  # it only ever warned for multivariate TPE
    if target == _CMAES and spec.get("restart_strategy") is None:
        spec.pop("inc_popsize", None)  # without a restart strategy it does nothing
    make = ResumableTPESampler if target == _TPE else get_object(target)  # a class or a factory
    if spec.get("seed") is None and (
        "seed" in spec or "seed" in inspect.signature(make).parameters
    ):
        spec["seed"] = seed
    spec["_target_"] = f"{make.__module__}.{make.__qualname__}"
    return instantiate(spec, **trusted())
