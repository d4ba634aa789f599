"""Components built from config: a data set, a model, an optimizer and its lr scheduler, each
from the config node whose ``_target_`` names its function or class.

The node's keys other than ``_target_`` and ``name`` (a label for tags) are the constructor's
arguments; the pipeline adds what only it knows: the model's ``input_shape`` and ``n_classes``
(from the data), the optimizer's parameters and the scheduler's optimizer. A constructor's
refusal of its arguments (a ValueError, TypeError, IndexError or KeyError) is reported as a
``ConfigError`` naming the group and the option, so a bad value reads the same whichever
component refused it; anything else (a full disk) passes through as it is.

A model and a data set know nothing of each other, so a built model is run once on two
validation examples: a model that cannot read the data set's inputs (token ids into a linear
layer), or whose output does not match its targets (one prediction per example where the targets
are one per position), is refused as a ConfigError before anything trains.

Any optimizer is held to torch.optim's standard (``build_optimizer``): a keyword it would ignore
is refused, a wrapper of another optimizer builds from parameters as GAO does, and the lr it
trains with is the configured one, the value every run records.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import textwrap
from collections.abc import Callable, Iterable
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gradalign.checks import is_number
from gradalign.config import ConfigError
from gradalign.data import Splits
from gradalign.hydra_compat import trusted
from gradalign.optim import resolve_base

_ARGUMENT_ERRORS = (ValueError, TypeError, IndexError, KeyError)


def build(group: str, node: DictConfig, *args: Any, **kwargs: Any) -> Any:
    """Call ``node._target_`` with ``args``, ``kwargs`` and the node's other keys but ``name``.

    Raises ConfigError when the target cannot be found or refuses its arguments.
    """
    spec = OmegaConf.to_container(node, resolve=True)
    label = spec.pop("name", None)
    target = _locate(spec.get("_target_"))
    if target is not None:
        _check_kinds(group, label, spec, target, spec)
    return _instantiate(group, label, spec, spec, *args, **kwargs)


def _check_kinds(
    group: str, label: Any, shown: dict[str, Any], target: Callable[..., Any], values: dict
) -> None:
    """Raise ConfigError for a value of ``values`` that is text where ``target``'s default for
    it is a number or a bool (``optimizer.lr=''``): the constructor would fail on an operator,
    with a message that names neither the key nor what it takes."""
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin)
        return
    for key, value in values.items():
        default = parameters[key].default if key in parameters else None
        if not isinstance(value, str) or default is None or default is inspect.Parameter.empty:
            continue
        if isinstance(default, bool):
            reason = f"{key}={value!r} is invalid: must be true or false"
            raise _refusal(group, label, shown, reason)
        if is_number(default):
            name = getattr(target, "__name__", target)
            raise _refusal(
                group,
                label,
                shown,
                f"{key}={value!r} is invalid: must be a number ({name}'s default: {default!r})",
            )


def _instantiate(
    group: str, label: Any, shown: dict[str, Any], spec: dict[str, Any], *args: Any, **kwargs: Any
) -> Any:
    """``spec`` (the node ``shown``, or a part of it) instantiated with ``args`` and ``kwargs``;
    a refusal of its arguments is a ConfigError naming ``group``, ``label`` and ``shown``."""
    try:
        return instantiate(spec, *args, _convert_="all", **trusted(), **kwargs)
    except _ARGUMENT_ERRORS as error:  # Hydra 1.4 raises the target's own error
        raise _refusal(group, label, shown, error) from None
    except InstantiationException as error:  # Hydra 1.3 wraps it
        cause = error.__cause__
        if isinstance(cause, ImportError):
            raise ConfigError(
                f"invalid {group} config {label!r}: _target_={spec.get('_target_')!r} cannot be "
                f"imported ({cause.__cause__ or cause})"
            ) from None
        if cause is not None and not isinstance(cause, _ARGUMENT_ERRORS):
            raise cause from None  # not a config problem (a full disk, a bug): as it is
        # (no cause: Hydra's own refusal, e.g. Hydra 1.4's of a target outside TRUSTED_TARGETS)
        raise _refusal(group, label, shown, cause or str(error).splitlines()[0]) from None


def _refusal(group: str, label: Any, spec: dict[str, Any], reason: Any) -> ConfigError:
    """The ConfigError of ``reason``, showing the node's arguments as the overrides that set
    them: ``invalid optimizer config 'adam' (optimizer.lr=-1, ...): <reason>``."""
    settings = ", ".join(f"{group}.{k}={v!r}" for k, v in spec.items() if k != "_target_")
    return ConfigError(f"invalid {group} config {label!r} ({settings}): {reason}")


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
    """``cfg.optimizer`` over ``params``, with the pipeline's ``options`` (GAO's stack_dims), held
    to torch.optim's standard whatever its ``_target_``:

    - A wrapper of an optimizer instance (pytorch_optimizer's Lookahead, OrthoGrad: a target
      that takes no ``base``, in a config that names one) builds as GAO does: its ``base`` over
      ``params`` with the keys the wrapper does not name, then the wrapper around it with those
      it names.
    - A keyword that a ``**kwargs`` catch-all would take and ignore is refused
      (``ignored_keywords``); the keys for a base (GAO's or a wrapper's) are checked against it.
    - It trains with the configured ``lr``: one whose param groups hold another (pytorch_optimizer's
      GrokFastAdamW divides it by 1 + grokfast_lamb) is refused, so the lr a run records is the
      lr it trains with.

    Raises ConfigError.
    """
    spec = OmegaConf.to_container(cfg.optimizer, resolve=True)
    label = spec.pop("name", None)
    make = functools.partial(_instantiate, "optimizer", label, spec)
    refuse = functools.partial(_refusal, "optimizer", label, spec)
    target = _locate(spec.get("_target_"))
    if target is None:  # not importable: instantiate says why
        return make(spec, params, **options)
    try:
        base = resolve_base(spec["base"]) if "base" in spec else None
    except ValueError as error:
        raise refuse(error) from None
    own = _parameters(target)[0]
    mine = {k: v for k, v in spec.items() if k in own}
    theirs = {k: v for k, v in spec.items() if k not in own and k not in ("_target_", "base")}
    _check_kinds("optimizer", label, spec, target, mine)
    _check_kinds("optimizer", label, spec, base or target, theirs)
    ignored = ignored_keywords(base or target, theirs)  # a base takes what target does not name
    if ignored:
        named = ", ".join(sorted(_parameters(base or target)[0] - {"params"}))
        raise refuse(
            f"{spec.get('base', spec['_target_'])} would ignore {', '.join(ignored)}: neither "
            f"one of its parameters ({named}) nor an option its code reads"
        )
    if base is not None and "base" not in own:  # a wrapper of an optimizer instance
        inner = make({"_target_": f"{base.__module__}.{base.__qualname__}", **theirs}, params)
        optimizer = make({"_target_": spec["_target_"], **mine}, inner, **options)
    else:
        optimizer = make(spec, params, **options)
    configured = spec.get("lr")
    used = sorted({float(group["lr"]) for group in optimizer.param_groups if "lr" in group})
    if is_number(configured) and used and used != [float(configured)]:
        raise refuse(
            f"{spec['_target_']} trains with lr={used[0]:.6g}, not the configured "
            f"lr={configured!r} that runs record: set the option that rescales it"
        )
    return optimizer


def build_scheduler(
    cfg: DictConfig, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``cfg.scheduler`` over ``optimizer``, stepped once per epoch by the training loop; None
    for ``scheduler=none`` (a node without ``_target_``). Over GAO it drives the base's lr (GAO's
    param_groups are its base's). Raises ConfigError, also for a scheduler whose ``step`` needs
    a metric (ReduceLROnPlateau), which the loop does not pass."""
    node = OmegaConf.select(cfg, "scheduler")
    if node is None or "_target_" not in node:
        return None
    scheduler = build("scheduler", node, optimizer)
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler) or isinstance(
        scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau
    ):
        raise ConfigError(
            f"invalid scheduler config {node.get('name')!r}: _target_={node._target_!r} is not "
            "a torch.optim.lr_scheduler.LRScheduler stepped without a metric"
        )
    return scheduler


def ignored_keywords(target: Callable[..., Any], keywords: Iterable[str]) -> list[str]:
    """The ``keywords`` that ``target`` would take through a ``**kwargs`` catch-all and never
    use: neither a parameter it names nor a key its own code looks up (``group.get("cautious")``,
    ``group["lr"]``: pytorch_optimizer's optional flags). None when its signature has no
    ``**kwargs``: Python refuses an unknown keyword itself."""
    named, catch_all = _parameters(target)
    if not catch_all:
        return []
    return [k for k in keywords if k not in named and k not in _keys_read(target)]


def _parameters(target: Callable[..., Any]) -> tuple[set[str], bool]:
    """The names of ``target``'s parameters, and whether it has a ``**kwargs`` catch-all."""
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin)
        return set(), False
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    catch_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    return {p.name for p in parameters if p.kind not in variadic}, catch_all


@functools.cache
def _keys_read(target: Callable[..., Any]) -> frozenset[str]:
    """The string keys that the code of ``target`` (a function, or a class and its base classes
    outside torch) looks up: ``x["key"]``, ``x.get("key")``, ``x.pop("key")``,
    ``x.setdefault("key")``."""
    keys = set()
    for code in target.__mro__ if isinstance(target, type) else (target,):
        if code is object or code.__module__.split(".")[0] == "torch":
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(code)))
        except (OSError, TypeError):  # no source to read: it reads nothing we can tell
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript):
                key = node.slice
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("get", "pop", "setdefault")
                and node.args
            ):
                key = node.args[0]
            else:
                continue
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                keys.add(key.value)
    return frozenset(keys)


def _locate(path: Any) -> Callable[..., Any] | None:
    """The class or function a ``_target_`` (``module.name``) names; None when it cannot be
    imported (instantiate then says why)."""
    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
