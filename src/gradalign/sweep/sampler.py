"""An Optuna TPE sampler whose fixed seed does not make a resumed study repeat its trials.

hydra-optuna-sweeper 1.3.0 resumes a persisted study (``load_if_exists=True``) but builds a new
sampler from the same seed, so the resumed process replays the first process's random start-up
suggestions: its first trials duplicate finished ones. This sampler seeds its random streams with
``seed + the number of the first trial it samples``: 0 for a new study (exactly
``TPESampler(seed)``), the count of trials already in the study for a resumed one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution
from optuna.samplers import RandomSampler, TPESampler
from optuna.study import Study
from optuna.trial import FrozenTrial


class ResumableTPESampler(TPESampler):
    """TPESampler (same arguments) that continues, not replays, its seed's stream on resume."""

    def __init__(self, *args: Any, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, seed=seed, **kwargs)
        self._seed = seed
        self._offset_pending = seed is not None

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        """Optuna calls this first for every trial; the first call offsets the seed."""
        if self._offset_pending:
            self._offset_pending = False
            seed = self._seed + trial.number
            self._rng = np.random.RandomState(seed)
            self._random_sampler = RandomSampler(seed=seed)
        return super().infer_relative_search_space(study, trial)
