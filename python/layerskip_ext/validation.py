"""Scalar checks shared by the config, checkpoint and generation entry points.

as_int / as_float accept what users pass (Python numbers, numpy scalars, 0-d torch tensors) and refuse
bools, strings and containers, so `True` is never a top_k of 1 and `"false"` never a truthy flag.
"""
from __future__ import annotations

import math
import numbers
import operator

from .errors import LayerSkipError


def check_unicode(text: str, what: str) -> str:
    """text, when it can be written as UTF-8; a lone surrogate ("\\ud800", which JSON and Python strings can hold)
    is an error naming `what` (the tokenizer would raise a bare TypeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise LayerSkipError(f"{what} is not valid Unicode: {text[e.start:e.end]!r} at character {e.start} is a "
                             "lone surrogate") from None
    return text


def as_int(x) -> int | None:
    """x as a Python int when it is an integral scalar (int, numpy integer, 0-d integer tensor), else None."""
    if isinstance(x, bool) or "bool" in str(getattr(x, "dtype", "")):
        return None
    if getattr(x, "ndim", 0) != 0:
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def as_float(x) -> float | None:
    """x as a Python float when it is a real scalar (int, float, numpy number, 0-d tensor), else None."""
    if isinstance(x, bool) or "bool" in str(getattr(x, "dtype", "")) or getattr(x, "ndim", 0) != 0:
        return None
    if isinstance(x, numbers.Real) or hasattr(x, "__float__") and hasattr(x, "dtype"):
        try:
            return float(x)
        except (TypeError, ValueError, OverflowError):
            return None
    return None


def check_int(name: str, x, low: int | None = None, high: int | None = None, error=LayerSkipError) -> int:
    """x as an int in [low, high] (None: unbounded), or `error` naming `name` and the range."""
    value = as_int(x)
    if value is None or (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else str(low)
        hi = "inf" if high is None else str(high)
        raise error(f"{name} must be an integer in [{lo}, {hi}], got {x!r}")
    return value


def check_float(name: str, x, low: float, high: float, low_open: bool = False, error=LayerSkipError) -> float:
    """x as a finite float in [low, high] ((low, high] when low_open), or `error` naming `name`."""
    value = as_float(x)
    ok = value is not None and math.isfinite(value) and value <= high and (value > low if low_open else value >= low)
    if not ok:
        raise error(f"{name} must be a finite number in {'(' if low_open else '['}{low}, {high}], got {x!r}")
    return value


def check_token_ids(name: str, ids, vocab_size: int) -> list[int]:
    """A 1-D sequence of token ids (list, tuple, numpy array, tensor; any integral scalars) as a list of ints
    in [0, vocab_size), or LayerSkipError naming the first bad entry."""
    if getattr(ids, "ndim", 1) != 1:
        raise LayerSkipError(f"{name} must be one-dimensional, got shape {tuple(ids.shape)}")
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise LayerSkipError(f"{name} must be a sequence of integers, got {type(ids).__name__}")
    out = []
    for t in ids:
        value = as_int(t)
        if value is None:
            raise LayerSkipError(f"{name} must be integers, got {t!r}")
        if not 0 <= value < vocab_size:
            raise LayerSkipError(f"{name}: token id {value} is out of range for vocabulary size {vocab_size}")
        out.append(value)
    return out
