"""Components built from config: a data set, a model and an optimizer, each from the config
node whose ``_target_`` names its function or class.

The node's keys other than ``_target_`` and ``name`` (a label for tags) are the constructor's
arguments; the pipeline adds what only it knows: the model's ``input_shape`` and ``n_classes``
(from the data) and the optimizer's parameters. A constructor's refusal of its arguments (a
ValueError, TypeError, IndexError or KeyError) is reported as a ``ConfigError`` naming the group
and the option, so a bad value reads the same whichever component refused it; anything else (a
full disk) passes through as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gradalign.config import ConfigError
from gradalign.data import Splits

_ARGUMENT_ERRORS = (ValueError, TypeError, IndexError, KeyError)


def build(group: str, node: DictConfig, *args: Any, **kwargs: Any) -> Any:
    """Call ``node._target_`` with ``args``, ``kwargs`` and the node's other keys but ``name``.

    Raises ConfigError when the target cannot be found or refuses its arguments.
    """
    spec = OmegaConf.to_container(node, resolve=True)
    label = spec.pop("name", None)
    try:
        return instantiate(spec, *args, _convert_="all", **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, ImportError):
            raise ConfigError(
                f"invalid {group} config {label!r}: _target_={spec.get('_target_')!r} cannot be "
                f"imported ({cause.__cause__ or cause})"
            ) from None
        if cause is not None and not isinstance(cause, _ARGUMENT_ERRORS):
            raise cause from None  # not a config problem (a full disk, a bug): as it is
        raise ConfigError(
            f"invalid {group} config {label!r} ({_settings(group, spec)}): {cause or error}"
        ) from None


def _settings(group: str, spec: dict[str, Any]) -> str:
    """A node's arguments as the overrides that set them: ``optimizer.lr=-1, ...``."""
    return ", ".join(f"{group}.{k}={v!r}" for k, v in spec.items() if k != "_target_")


def build_dataset(cfg: DictConfig) -> Splits:
    """The train/val/test splits of ``cfg.dataset``."""
    splits = build("dataset", cfg.dataset)
    if not isinstance(splits, Splits):
        raise ConfigError(
            f"invalid dataset config {cfg.dataset.name!r}: its _target_ returned "
            f"{type(splits).__name__}, not gradalign.data.Splits"
        )
    return splits


def build_model(cfg: DictConfig, splits: Splits) -> torch.nn.Module:
    """``cfg.model`` for examples of ``splits.input_shape`` and ``splits.n_classes`` classes."""
    return build(
        "model", cfg.model, input_shape=list(splits.input_shape), n_classes=splits.n_classes
    )


def build_optimizer(cfg: DictConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``params``."""
    return build("optimizer", cfg.optimizer, params)


def check_optimizer(cfg: DictConfig) -> None:
    """Build ``cfg.optimizer`` on a dummy parameter, so its constructor checks its arguments
    before anything is trained. Raises ConfigError."""
    build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2, 2))])
