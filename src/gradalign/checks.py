"""Argument checks shared by constructors and the config: plain Python, no third-party import.

Each component validates its own arguments (a model its widths, a dataset its split fraction,
an optimizer its hyperparameters), so a bad value is refused by the code that would misuse it,
with a message naming the argument, the value and what is allowed.

Errors the user must fix (a bad setting, a missing sweep, a report name taken) are UserErrors:
the command-line tools print their message as one line and exit with status 2. Any other
exception is a bug or an accident (a shape mismatch, CUDA out of memory) and keeps its traceback.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any


class UserError(Exception):
    """Something only the user can fix; its message says what and how, in one line (or a few,
    when it shows a log). Subclasses say what kind (config.ConfigError: a bad setting)."""


def is_number(value: Any) -> bool:
    """A real number (a bool is not one, though Python says it is)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    """An integer (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(what: str, value: Any) -> int:
    """``value`` if it is an int >= 1 (a bool is not), else ValueError naming ``what``."""
    if not (is_int(value) and value >= 1):
        raise ValueError(f"{what}={value!r} is invalid: must be an integer >= 1")
    return value


def positive_ints(what: str, values: Any) -> list[int]:
    """``values`` as a list if it is a sequence of ints >= 1, else ValueError naming ``what``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{what}={values!r} is invalid: must be a list of integers >= 1")
    for value in values:
        if not (is_int(value) and value >= 1):
            raise ValueError(f"{what}={list(values)!r} is invalid: must be a list of integers >= 1")
    return list(values)


def channels_and_length(input_shape: Any) -> tuple[int, int]:
    """A 1-d signal's (channels, length) from one example's shape: (length,) is one channel,
    (C, length) is taken as is; else ValueError naming the shape."""
    shape = positive_ints("input_shape", input_shape)
    if len(shape) not in (1, 2):
        raise ValueError(f"input_shape={shape} is invalid: must be (length,) or (C, length)")
    return (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])


def boolean(what: str, value: Any) -> bool:
    """``value`` if it is a bool, else ValueError naming ``what``."""
    if not isinstance(value, bool):
        raise ValueError(f"{what}={value!r} is invalid: must be true or false")
    return value


def fraction(what: str, value: Any) -> float:
    """``value`` if it is a number strictly between 0 and 1, else ValueError naming ``what``."""
    if not (is_number(value) and 0 < value < 1):
        raise ValueError(f"{what}={value!r} is invalid: must be a number in (0, 1)")
    return float(value)


def probability(what: str, value: Any) -> float:
    """``value`` if it is a number in [0, 1) (a dropout rate), else ValueError naming ``what``."""
    if not (is_number(value) and 0 <= value < 1):
        raise ValueError(f"{what}={value!r} is invalid: must be a number in [0, 1)")
    return float(value)
