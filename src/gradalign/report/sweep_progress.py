"""What a study's sweeps have done so far, shown while they run: for each sweep, its trials done of
its budget, the best objective so far and the time left, read from the Optuna study the sweep
writes (the study's storage is the one place that knows, whichever process runs the trials).

On a terminal each sweep has one line that tqdm rewrites in place; elsewhere (a log file, CI) a
plain line per sweep whenever its count changed, at most once every ``interval_s``, so logs hold
a few lines rather than a bar's redraws.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Mapping
from typing import TextIO

import optuna
import sqlalchemy.exc
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import TrialState
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gradalign.budget import DONE  # what n_trials counts, as the sweep loop counts it

PLAIN_INTERVAL_S = 60.0  # the least time between two plain lines of one sweep


def _duration(seconds: float) -> str:
    """``42 s``, ``7 min``, ``2.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class SweepProgress:
    """The progress of the sweeps ``budgets`` names (Optuna study name -> the trials it runs to,
    its ``n_trials``) in the Optuna ``storage``, written to ``stream`` (stderr) by
    ``update`` and ended by ``close``."""

    def __init__(
        self,
        storage: BaseStorage,
        budgets: Mapping[str, int],
        stream: TextIO | None = None,
        interval_s: float = PLAIN_INTERVAL_S,
    ):
        self.storage = storage
        self.budgets = dict(budgets)
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.terminal = self.stream.isatty()
        self.first: dict[str, tuple[int, float]] = {}  # trials counted when first seen, and when
        self.shown: dict[str, tuple[int, float]] = {}  # last plain line: (done, when)
        self.bars: dict[str, tqdm] = {}
        self.known: dict[str, tuple[int, float | None]] = {}
        self._logging = logging_redirect_tqdm() if self.terminal else None

    def __enter__(self) -> SweepProgress:
        """While the sweeps run, log lines on a terminal print above the sweeps' lines."""
        if self._logging is not None:
            self._logging.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(final=exc[0] is None)  # after an error, no more reading
        if self._logging is not None:
            self._logging.__exit__(*exc)

    def state(self, name: str) -> tuple[int, float | None]:
        """Sweep ``name``'s trials counted so far and its best finite objective (None: none yet,
        or its study not created yet); while a sweep holds the storage locked, the last known."""
        with contextlib.suppress(sqlalchemy.exc.OperationalError):  # locked: try again later
            self.known[name] = self._read(name)
        return self.known.get(name, (0, None))

    def _read(self, name: str) -> tuple[int, float | None]:
        try:
            study = optuna.load_study(study_name=name, storage=self.storage)
        except KeyError:  # the sweep has not created its study yet
            return 0, None
        trials = study.get_trials(deepcopy=False, states=DONE)
        values = [
            t.value
            for t in trials
            if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)
        ]
        if not values:
            return len(trials), None
        pick = min if study.direction == StudyDirection.MINIMIZE else max
        return len(trials), pick(values)

    def line(self, name: str, done: int, best: float | None, now: float) -> str:
        """``<name>: 12/30 trials, best 1.1234, about 4 min left``."""
        budget = self.budgets[name]
        first, since = self.first.setdefault(name, (done, now))
        ran = done - first
        shown = f"{name}: {done}/{budget} trials, best " + ("-" if best is None else f"{best:.4f}")
        if done >= budget:
            return f"{shown}, done"
        if ran <= 0:
            return f"{shown}, time left unknown until a trial ends"
        left = (now - since) / ran * (budget - done)
        return f"{shown}, about {_duration(left)} left"

    def update(self, names: tuple[str, ...] | None = None, *, final: bool = False) -> None:
        """Show the sweeps ``names`` (default: all) as their studies now record them; a plain
        line only for a sweep not shown yet, or whose count changed ``interval_s`` or more since
        its last line (``final``: whenever it changed)."""
        now = time.monotonic()
        for name in names if names is not None else tuple(self.budgets):
            done, best = self.state(name)
            text = self.line(name, done, best, now)
            if self.terminal:
                bar = self.bars.get(name)
                if bar is None:
                    bar = self.bars[name] = tqdm(
                        total=self.budgets[name],
                        file=self.stream,
                        position=len(self.bars),
                        bar_format="{bar:20} {desc}",
                        leave=True,
                    )
                bar.n = min(done, self.budgets[name])
                bar.set_description_str(text, refresh=True)
                continue
            last = self.shown.get(name)
            waited = final or (last is not None and now - last[1] >= self.interval_s)
            if last is None or (done != last[0] and waited):
                self.stream.write(text + "\n")
                self.stream.flush()
                self.shown[name] = (done, now)

    def close(self, final: bool = True) -> None:
        """Show the final state of every sweep shown (unless not ``final``), and end the
        terminal's lines."""
        if final:
            self.update(tuple(self.shown) + tuple(self.bars), final=True)
        for bar in self.bars.values():
            bar.close()
