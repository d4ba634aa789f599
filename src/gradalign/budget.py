"""A study's budget: ``hydra.sweeper.n_trials`` is how many results the study's sweeps make in
all, not how many trials each run of the sweep adds.

A trial counts against the budget once it is a result, COMPLETE (a diverged trial is COMPLETE,
value inf) or PRUNED, or while a sweep process runs it (RUNNING, with an owner: its result is on
the way). A FAIL is no result: it was raised or interrupted, and a trial runs in its place. So
rerunning an interrupted sweep runs only the trials missing, rerunning a complete one runs none,
and adding trials is an explicit choice: a larger ``hydra.sweeper.n_trials``. Processes that
share a study fill one budget together.

The sweep loop (gradalign.sweep.sweeper) counts what is left before each batch it asks; a study
(gradalign.report.study) counts the same way to know which of its sweeps to start at all.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from optuna.trial import TrialState

DONE = (TrialState.COMPLETE, TrialState.PRUNED)
OWNER = "owner"  # the user attr of a trial a sweep process took (gradalign.sweep.trial)


@dataclasses.dataclass(frozen=True)
class Budget:
    """``n_trials`` (the budget), how many trials of the study are ``done`` (COMPLETE or
    PRUNED) and how many ``running`` (RUNNING: in flight in some process)."""

    n_trials: int
    done: int
    running: int = 0

    @property
    def left(self) -> int:
        """How many trials a sweep process asks now to complete the budget."""
        return max(0, self.n_trials - self.done - self.running)

    def line(self, study_name: str) -> str:
        """The one line a sweep of a stored study starts with: what it runs and why."""
        running = f", {self.running} running in another process" if self.running else ""
        counted = (
            f"study {study_name!r}: {self.done} of {self.n_trials} trials done{running} "
            "(hydra.sweeper.n_trials, the study's budget)"
        )
        if self.left == 0:
            return f"{counted}, so no trial runs; a larger hydra.sweeper.n_trials adds trials"
        return f"{counted}, running the {self.left} missing"


def budget(study: Any, n_trials: int) -> Budget:
    """The Budget of ``study`` (an ``optuna.Study``) for ``n_trials``. A RUNNING trial without
    an owner is not counted: it is the leftover of an interrupted ask, which the sweep fails."""
    trials = study.get_trials(deepcopy=False, states=(*DONE, TrialState.RUNNING))
    done = sum(trial.state in DONE for trial in trials)
    running = sum(
        trial.state == TrialState.RUNNING and OWNER in trial.user_attrs for trial in trials
    )
    return Budget(n_trials, done, running)
