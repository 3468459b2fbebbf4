"""Argument checks shared by every public entry point of avalanche-tsn.

One rule for all of them: a value of the wrong type raises ``TypeError``, a value of the
right type outside its allowed range raises ``ValueError``; both name the argument and what
it accepts. Nothing is coerced (``int(8.5)`` would be a silent wrong answer), and ``bool``
is never taken for a number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "check_int",
    "check_float",
    "check_bool",
    "check_shape",
    "check_choice",
    "check_float32",
]


def check_int(value: object, name: str, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` if it is an int in ``[low, high]`` (either bound may be None).

    :param value: the value given.
    :param name: the argument's name, for the error.
    :param low: the smallest allowed value, or None.
    :param high: the largest allowed value, or None.
    :raises TypeError: if ``value`` is not an int (a bool or a float is not).
    :raises ValueError: if it is out of range.
    """
    allowed = _interval(low, high, "an int")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def check_float(
    value: object,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float if it is a real number in the given interval (never NaN).

    :param value: the value given (an int or a float).
    :param name: the argument's name, for the error.
    :param low: the lower bound, or None.
    :param high: the upper bound, or None.
    :param low_open: exclude ``low`` itself.
    :param high_open: exclude ``high`` itself.
    :raises TypeError: if ``value`` is not an int or a float.
    :raises ValueError: if it is NaN or outside the interval.
    """
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    allowed = f"a float in {left}{lo}, {hi}{right}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}")
    v = float(value)
    bad = math.isnan(v)
    if low is not None:
        bad = bad or (v <= low if low_open else v < low)
    if high is not None:
        bad = bad or (v >= high if high_open else v > high)
    if bad:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return v


def check_bool(value: object, name: str) -> bool:
    """Return ``value`` if it is a bool.

    :param value: the value given.
    :param name: the argument's name, for the error.
    :raises TypeError: if it is anything else (0 and 1 included).
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_shape(value: object, name: str) -> tuple[int, ...]:
    """Return ``value`` as a tuple if it is a non-empty sequence of positive ints.

    :param value: the shape given (a tuple, a list or a ``torch.Size``).
    :param name: the argument's name, for the error.
    :raises TypeError: if it is not a sequence of ints.
    :raises ValueError: if it is empty or holds a size below 1.
    """
    allowed = "a non-empty sequence of positive ints (one sample's shape)"
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}")
    for s in value:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"{name} must be {allowed}, got {value!r}")
    if len(value) == 0 or any(s < 1 for s in value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return tuple(int(s) for s in value)


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of the strings ``choices``.

    :param value: the value given.
    :param name: the argument's name, for the error.
    :param choices: the allowed strings.
    :raises TypeError: if it is not a string.
    :raises ValueError: if it is another string.
    """
    allowed = f"one of {', '.join(repr(c) for c in choices)}"
    if not isinstance(value, str):
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def check_float32(module: nn.Module, name: str) -> None:
    """Raise a TypeError naming the first floating-point tensor of ``module`` that is not float32.

    TSN keeps every task's frozen values, codebooks and statistics in float32 and trains the
    live subnetwork against them; a model cast to another precision would fail inside a
    training step, after its task was opened. Mixed precision goes through ``torch.autocast``,
    which leaves the stored values float32.

    :param module: the model, checked before any of it changes.
    :param name: what to call it in the error.
    :raises TypeError: if a parameter or buffer has a floating-point dtype other than float32.
    """
    for kind, tensors in (
        ("parameter", module.named_parameters()),
        ("buffer", module.named_buffers()),
    ):
        for where, tensor in tensors:
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                raise TypeError(
                    f"{name} {kind} {where} is {tensor.dtype}; TSN trains and stores float32 "
                    f"models: cast it with {name}.float() (for mixed precision, train under "
                    "torch.autocast, which keeps the stored values float32)"
                )


def _interval(low: int | None, high: int | None, kind: str) -> str:
    if low is not None and high is not None:
        return f"{kind} in {low}..{high}"
    if low is not None:
        return f"{kind} >= {low}"
    if high is not None:
        return f"{kind} <= {high}"
    return kind
