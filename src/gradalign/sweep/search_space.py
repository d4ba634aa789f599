"""A sweep's search space: hydra-optuna-sweeper's grammar read into current Optuna
distributions.

The keys of ``hydra.sweeper.params`` and the sweep's command-line overrides, parsed by Hydra's
own override parser, map to Optuna as hydra-optuna-sweeper documents it:

- ``interval(a, b)``: uniform over [a, b] (``FloatDistribution``; ``IntDistribution`` when both
  ends are integers); ``tag(log, interval(a, b))`` on a log scale;
- ``choice(x, y, ...)``: ``CategoricalDistribution``;
- ``range(start, stop[, step])``: Hydra's range (``stop`` excluded, as Hydra's basic sweeper and
  hydra-optuna-sweeper 1.4 read it) as a stepped ``IntDistribution`` or ``FloatDistribution``;
  ``shuffle(range(...))`` as a choice of its values;
- anything else is a fixed value, passed to every trial as it was written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """What a sweep searches (key -> distribution, in the order given) and what it fixes
    (key -> the override's value as written)."""

    distributions: dict[str, BaseDistribution]
    fixed: dict[str, str]

    def grid(self) -> dict[str, list[Any]]:
        """Every value of each distribution, for Optuna's GridSampler; ValueError naming a key
        whose distribution is continuous."""
        return {key: _values(key, d) for key, d in self.distributions.items()}


def parse(overrides: Iterable[str]) -> SearchSpace:
    """The search space of ``overrides`` (``key=value`` strings: hydra.sweeper.params, then the
    command line's, a later key replacing an earlier one); ValueError naming a key whose sweep
    Optuna cannot sample."""
    distributions: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.get_key_element()
        distributions.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            try:
                distributions[key] = _distribution(override)
            except ValueError as error:
                raise ValueError(f"search space {override.input_line}: {error}") from None
        else:
            fixed[key] = override.get_value_element_as_str()
    return SearchSpace(distributions, fixed)


def _distribution(override: Override) -> BaseDistribution:
    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(Transformer.encode)))
    if override.is_range_sweep():
        values = list(override.sweep_iterator(Transformer.identity))
        if not values:
            raise ValueError("the range holds no value")
        low, high, step = min(values), max(values), abs(value.step)
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(low, high, step=step)
        return FloatDistribution(low, high, step=float(step))
    if override.is_interval_sweep():
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(value.start, value.end, log=log)
    raise ValueError("Optuna samples interval(), choice() and range() sweeps only")


def _values(key: str, distribution: BaseDistribution) -> list[Any]:
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if distribution.step is None:
        raise ValueError(
            f"hydra/sweeper/sampler=grid needs a discrete search space, but {key} is "
            f"{distribution}: give it choice(...) or range(...)"
        )
    count = round((distribution.high - distribution.low) / distribution.step) + 1
    return [distribution.low + i * distribution.step for i in range(count)]
