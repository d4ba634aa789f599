"""What gradalign's sweeper takes from hydra-optuna-sweeper, checked when it is imported.

gradalign.sweep.sweeper subclasses the stock ``OptunaSweeperImpl`` and overrides some of its
private methods. They are only known to behave as expected in release ``TESTED_RELEASE``; any
other release, or one whose overridden functions changed their arguments, fails at import with a
message naming the tested release, never with a surprise mid-sweep.

The stock code builds Optuna 2-era distributions (``UniformDistribution`` and the like), which
current Optuna deprecates with a FutureWarning at every construction and every reload of a
stored trial. ``params_from_overrides`` and ``current_distributions`` give the same search space
as current Optuna's ``FloatDistribution``/``IntDistribution``, so trials are stored in today's
form; ``legacy_distributions_quiet`` silences exactly the deprecation of the classes the stock
code still builds inside its own loop.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution

TESTED_RELEASE = "1.3.0"
_INSTALL = f"install hydra-optuna-sweeper=={TESTED_RELEASE} (README, Install)"

try:
    from hydra_plugins.hydra_optuna_sweeper import _impl
except ImportError as error:  # e.g. an Optuna that no longer has the classes it imports
    raise ImportError(
        f"hydra-optuna-sweeper does not import ({error}): gradalign's sweeper is tested with "
        f"hydra-optuna-sweeper {TESTED_RELEASE} on Optuna 4.9 to 5.x; {_INSTALL}"
    ) from error

# The stock functions gradalign's sweeper overrides or calls, with their parameters in 1.3.0.
OVERRIDDEN = {
    "OptunaSweeperImpl.__init__": [
        "self",
        "sampler",
        "direction",
        "storage",
        "study_name",
        "n_trials",
        "n_jobs",
        "max_failure_rate",
        "search_space",
        "custom_search_space",
        "params",
    ],  # fmt: skip
    "OptunaSweeperImpl.setup": ["self", "hydra_context", "task_function", "config"],
    "OptunaSweeperImpl.sweep": ["self", "arguments"],
    "OptunaSweeperImpl._configure_trials": [
        "self",
        "trials",
        "search_space_distributions",
        "fixed_params",
    ],  # fmt: skip
    "OptunaSweeperImpl._parse_sweeper_params_config": ["self"],
    "OptunaSweeperImpl._get_directions": ["self"],
    "create_params_from_overrides": ["arguments"],
}
_LEGACY = r"(Int)?(Log|Discrete)?Uniform(Distribution)? has been deprecated in v3\.0\.0"


def _parameters(dotted: str) -> list[str] | None:
    found: Any = _impl
    for name in dotted.split("."):
        found = getattr(found, name, None)
    return list(inspect.signature(found).parameters) if callable(found) else None


def check_release() -> None:
    """Raise ImportError unless the installed hydra-optuna-sweeper is the tested release with
    the tested signatures of every function gradalign's sweeper relies on."""
    installed = importlib.metadata.version("hydra-optuna-sweeper")
    changed = [name for name, params in OVERRIDDEN.items() if _parameters(name) != params]
    if installed != TESTED_RELEASE or changed:
        detail = f" and its {', '.join(changed)} changed" if changed else ""
        raise ImportError(
            f"gradalign's sweeper overrides private functions of hydra-optuna-sweeper "
            f"{TESTED_RELEASE}, the one release it is tested with, but {installed} is installed"
            f"{detail}: {_INSTALL}"
        )


check_release()
OptunaSweeperImpl = _impl.OptunaSweeperImpl


@contextlib.contextmanager
def legacy_distributions_quiet() -> Iterator[None]:
    """Silence the FutureWarning of the Optuna 2-era distribution classes, and only that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LEGACY, category=FutureWarning)
        yield


def current_distribution(distribution: BaseDistribution) -> BaseDistribution:
    """``distribution`` as current Optuna's FloatDistribution or IntDistribution (the same
    values, log and step); categorical ones unchanged."""
    for modern in (FloatDistribution, IntDistribution):
        if isinstance(distribution, modern):
            return modern(
                distribution.low,
                distribution.high,
                log=distribution.log,
                step=distribution.step,
            )
    return distribution


def current_distributions(
    distributions: Mapping[str, BaseDistribution],
) -> dict[str, BaseDistribution]:
    """``current_distribution`` of each."""
    return {key: current_distribution(d) for key, d in distributions.items()}


def params_from_overrides(
    arguments: list[str],
) -> tuple[dict[str, BaseDistribution], dict[str, Any]]:
    """The stock parsing of sweep overrides (``interval``, ``tag(log, ...)``, ``choice``,
    ``range``, fixed values) into (distributions, fixed values), in current Optuna's classes."""
    with legacy_distributions_quiet():
        distributions, fixed = _impl.create_params_from_overrides(arguments)
    return current_distributions(distributions), fixed
