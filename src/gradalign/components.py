"""Components built from config: a data set, a model and an optimizer, each from the config
node whose ``_target_`` names its function or class.

The node's keys other than ``_target_`` and ``name`` (a label for tags) are the constructor's
arguments; the pipeline adds what only it knows: the model's ``input_shape`` and ``n_classes``
(from the data) and the optimizer's parameters. A constructor's refusal of its arguments (a
ValueError, TypeError, IndexError or KeyError) is reported as a ``ConfigError`` naming the group
and the option, so a bad value reads the same whichever component refused it; anything else (a
full disk) passes through as it is.

A model and a data set know nothing of each other, so a built model is run once on two
validation examples: a model that cannot read the data set's inputs (token ids into a linear
layer), or whose output does not match its targets (one prediction per example where the targets
are one per position), is refused as a ConfigError before anything trains.
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
    """``cfg.model`` for examples of ``splits.input_shape`` and ``splits.n_classes`` classes,
    checked to read ``splits``' inputs and to predict its targets' shape (``check_fits``)."""
    data = f"dataset {cfg.dataset.name!r}"
    shape, n_classes = list(splits.input_shape), splits.n_classes
    try:
        model = build("model", cfg.model, input_shape=shape, n_classes=n_classes)
    except ConfigError as error:  # the data's shapes may be what the model refused
        raise ConfigError(
            f"{error} ({data} has input_shape={shape}, n_classes={n_classes})"
        ) from None
    check_fits(model, splits, f"model {cfg.model.name!r} does not fit {data}")
    return model


def check_fits(model: torch.nn.Module, splits: Splits, refusal: str) -> None:
    """Run ``model`` (in eval mode, without gradients, so no random number is drawn) on the first
    two validation examples; raise ConfigError ``refusal: <why>`` unless it returns logits of
    shape ``targets.shape + (n_classes,)``. Its train/eval mode is left as it was."""
    x, y = splits.x_val[:2], splits.y_val[:2]
    inputs = f"inputs of shape {tuple(x.shape)} and dtype {str(x.dtype).removeprefix('torch.')}"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
    except (RuntimeError, TypeError, ValueError, IndexError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConfigError(
            f"{refusal}: on {inputs} the model raised {type(error).__name__}: {reason}"
        ) from None
    finally:
        model.train(was_training)
    expected = (*y.shape, splits.n_classes)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(
            f"{refusal}: on {inputs} the model returned {got}, but targets of shape "
            f"{tuple(y.shape)} need logits of shape {expected}"
        )


def build_optimizer(
    cfg: DictConfig, params: Iterable[torch.nn.Parameter], **options: Any
) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``params``, with the pipeline's ``options`` (GAO's stack_dims)."""
    return build("optimizer", cfg.optimizer, params, **options)


def check_optimizer(cfg: DictConfig) -> None:
    """Build ``cfg.optimizer`` on a dummy parameter, so its constructor checks its arguments
    before anything is trained. Raises ConfigError."""
    build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2, 2))])
