"""Settings declared once. Each key of a settings dataclass (report.settings) carries, as field
metadata, what it means and what it allows; its type is the field's annotation. From that one
declaration come the key's command-line flag (``final_epochs``: ``--final-epochs``, typed and
counted from the annotation), its line in ``--help``, and the check of its value, whether it came
from a YAML file (conf/report.yaml, conf/study/<preset>.yaml) or from a flag.

A bad value fails with one line naming the key, the value and what is allowed (a ConfigError:
the user's to fix).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from gradalign.checks import is_int, is_number
from gradalign.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Key:
    """What one settings key means and allows, beyond its type.

    ``allowed`` says what ``valid`` accepts (the error message's "must be ..."); ``group`` makes
    its values names of ``conf/<group>/*.yaml``; ``flag``: it has a command-line flag; ``yaml``:
    it may be set in a settings file; ``param``: it decides what a report computes, so the
    report's MLflow run logs it (and a resumed report must have the same).
    """

    help: str
    allowed: str = ""
    valid: Callable[[Any], bool] | None = None
    group: str | None = None
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    flag: bool = True
    yaml: bool = True
    param: bool = True

    def names(self, root: str | Path) -> list[str]:
        """The names its values must be: the configs of its conf/ group (the stems of
        ``conf/<group>/*.yaml``), else its ``choices``; empty when any value of its type is."""
        if self.group is None:
            return list(self.choices)
        return sorted(path.stem for path in (Path(root) / "conf" / self.group).glob("*.yaml"))


def key(help: str, *, default: Any = dataclasses.MISSING, **options: Any) -> Any:
    """A dataclass field that is a settings key (``options``: the other fields of Key); a
    mapping default is copied for each instance."""
    metadata = {"key": Key(help, **options)}
    if isinstance(default, Mapping):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def keys(cls: type) -> dict[str, tuple[Key, Any, bool]]:
    """The settings keys of dataclass ``cls`` in field order: name -> (Key, its type, whether
    it may be None: an annotation ``X | None`` is type X, nullable)."""
    found, hints = {}, typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if "key" in field.metadata:
            hint = hints[field.name]
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            kind = [t for t in typing.get_args(hint) if t is not type(None)][0] if union else hint
            found[field.name] = (field.metadata["key"], kind, union)
    return found


def fail(name: str, value: Any, allowed: str) -> NoReturn:
    """Refuse setting ``name``'s ``value``, saying what is ``allowed``."""
    raise ConfigError(f"invalid setting {name}={value!r}: must be {allowed}")


_SCALARS: dict[Any, tuple[Callable[[Any], bool], str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (is_int, "an integer"),
    float: (is_number, "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def check(name: str, value: Any, spec: Key, kind: Any, nullable: bool, root: str | Path) -> Any:
    """``value`` of key ``name`` if it is of type ``kind`` (lists become tuples, integers
    floats where a float is declared) or a ``nullable`` None, and ``spec`` accepts it; else
    ConfigError."""
    if value is None:
        if not nullable:
            fail(name, value, spec.allowed or "set (not null)")
        return None
    names = spec.names(root)
    if typing.get_origin(kind) is tuple:
        element = typing.get_args(kind)[0]
        ok, what = _SCALARS[element]
        if isinstance(value, str) or not isinstance(value, Sequence) or not all(map(ok, value)):
            fail(name, value, spec.allowed or f"a list of {what.split(' ', 1)[1]}s")
        value = tuple(value)
        unknown = [v for v in value if names and v not in names]
        if unknown:
            fail(name, list(value), f"names from {names} (unknown: {unknown})")
        if spec.valid is not None and not spec.valid(value):
            fail(name, list(value), spec.allowed)
        return value
    if kind in _SCALARS:
        ok, what = _SCALARS[kind]
        if not ok(value):
            fail(name, value, spec.allowed or what + (", or null" if nullable else ""))
        if names and value not in names:
            where = f" (conf/{spec.group}/)" if spec.group else ""
            fail(name, value, f"one of {names}{where}")
        if spec.valid is not None and not spec.valid(value):
            fail(name, value, spec.allowed)
        return float(value) if kind is float else value
    if typing.get_origin(kind) is Mapping:
        if not isinstance(value, Mapping):
            fail(name, value, spec.allowed or "a mapping")
        inner = typing.get_args(kind)[1]
        return {k: check(f"{name}.{k}", v, Key(""), inner, False, root) for k, v in value.items()}
    return value


def read(
    cls: type,
    values: Mapping[str, Any],
    root: str | Path,
    *,
    source: str = "yaml",
    what: str = "settings",
    prefix: str = "",
    extra: Iterable[str] = (),
) -> dict[str, Any]:
    """The values of ``cls``'s keys in ``values`` (from ``source``: ``yaml`` or ``flag``), each
    checked (``prefix`` goes before the names in messages). Other keys, but for ``extra`` ones
    left to the caller, are refused as unknown ``what``."""
    declared = {name: item for name, item in keys(cls).items() if getattr(item[0], source)}
    unknown = sorted(set(values) - set(declared) - set(extra))
    if unknown:
        allowed = sorted({*declared, *extra})
        raise ConfigError(f"unknown {what} {unknown}: allowed {allowed}")
    return {
        name: check(prefix + name, values[name], *declared[name], root)
        for name in declared
        if name in values
    }


def add_flags(
    parser: argparse.ArgumentParser, cls: type, root: str | Path, defaults: Mapping[str, Any]
) -> None:
    """A flag for each key of ``cls`` that has one, typed and counted from its type; its help
    says what is allowed and, from ``defaults``, the value used without it. Flags not given
    are None."""
    for name, (spec, kind, _) in keys(cls).items():
        if not spec.flag:
            continue
        names = spec.names(root)
        shown = "null" if defaults.get(name) is None else defaults[name]
        if isinstance(shown, Sequence) and not isinstance(shown, str):
            shown = " ".join(map(str, shown))
        text = spec.help + (f"; one of {', '.join(names)}" if names else "")
        if spec.yaml or kind is not bool:
            text += f" (default: {shown})"
        options: dict[str, Any] = {"help": text.replace("%", "%%")}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction if spec.yaml else "store_true"
        elif typing.get_origin(kind) is tuple:
            options |= {"nargs": "+", "type": typing.get_args(kind)[0]}
        else:
            options["type"] = kind
        if spec.metavar and kind is not bool:
            options["metavar"] = spec.metavar
        parser.add_argument(f"--{name.replace('_', '-')}", default=None, **options)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values of the flags of ``cls``'s keys that were given on the command line."""
    values = {
        name: getattr(args, name, None) for name, (spec, *_) in keys(cls).items() if spec.flag
    }
    return {name: value for name, value in values.items() if value is not None}
