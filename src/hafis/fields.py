"""What a config key allows, declared beside its field: choices, a numeric range, a relation to another key, and
whether it may change when a run is resumed.

A field written ``k: int = positive(5, at_most="model.feature_dim")`` carries its constraint in the dataclass
metadata, so the one validator in :mod:`hafis.config` checks every key the same way and a new key gets the check by
wrapping its default. Imports no other hafis module but :mod:`hafis.errors` (for bounded quotes of values), so that
any config dataclass (e.g. the synthetic scenes') can use it.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import field
from typing import Any, Callable, Optional

from hafis.errors import short

__all__ = ["choice", "registry", "RegistryNames", "bounded", "positive", "nonneg", "unit", "runtime", "range_error",
           "relation_errors", "is_runtime"]


def _field(default: Any, meta: dict, runtime: bool) -> Any:
    if runtime:
        meta["runtime"] = True
    if callable(default):  # mutable defaults (lists) come as a factory
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def choice(default: Any, *choices: Any, runtime: bool = False) -> Any:
    """A key whose value must be one of ``choices`` (for values implemented in place, such as a mode switch; a key
    whose values name implementations takes them from their registry: :func:`registry`)."""
    return _field(default, {"choices": choices}, runtime)


class RegistryNames:
    """The names of a registry (``"module:ATTRIBUTE"``, a dict or tuple), read when first asked for.

    The registries (segmenters, frameworks, detectors) import the config, so the config cannot import them; reading
    them at validation time keeps each list of names in one place.
    """

    def __init__(self, ref: str, by: Optional[str] = None) -> None:
        self.ref, self.by = ref, by

    def names(self) -> tuple:
        module, _, attribute = self.ref.partition(":")
        return tuple(getattr(importlib.import_module(module), attribute))

    def names_for(self, key: Any) -> tuple:
        """``by`` registries map the value of the sibling key ``by`` to the names allowed with it."""
        module, _, attribute = self.ref.partition(":")
        return tuple(getattr(importlib.import_module(module), attribute).get(key, ()))

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, value: Any) -> bool:
        return value in self.names()

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"RegistryNames({self.ref!r})"


def registry(default: Any, ref: str, runtime: bool = False, by: Optional[str] = None) -> Any:
    """A key whose value must be a name of the registry ``ref`` (``"module:ATTRIBUTE"``); with ``by`` (a sibling key
    of the same section) the registry maps that key's value to the names allowed with it."""
    return _field(default, {"choices": RegistryNames(ref, by)}, runtime)


def bounded(default: Any, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
            hi_open: bool = False, at_most: Optional[str] = None, at_least: Optional[str] = None,
            ordered: bool = False, runtime: bool = False) -> Any:
    """A numeric key (or each element of a numeric tuple / list) in ``[lo, hi]`` (``lo_open`` / ``hi_open`` exclude
    the ends); ``at_most`` / ``at_least`` name another key (dotted, from the top) it is compared with, ``ordered``
    makes a tuple non-decreasing (a low <= high pair). ``None`` of an optional key is always allowed."""
    meta = {"range": (lo, hi, lo_open, hi_open), "at_most": at_most, "at_least": at_least, "ordered": ordered}
    return _field(default, meta, runtime)


def positive(default: Any, **relations: Any) -> Any:
    """> 0: sizes, counts, intervals, learning rates."""
    return bounded(default, 0, lo_open=True, **relations)


def nonneg(default: Any, **relations: Any) -> Any:
    """>= 0: loss weights, optional counts where 0 means "none"."""
    return bounded(default, 0, **relations)


def unit(default: Any, **relations: Any) -> Any:
    """In [0, 1]: probabilities, confidence thresholds, EMA decays."""
    return bounded(default, 0, 1, **relations)


def runtime(default: Any) -> Any:
    """A key that changes how a run is executed or reported, not what it trains: it may change on resume."""
    return _field(default, {}, True)


def is_runtime(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("runtime"))


def _interval(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    def num(v: float) -> str:
        return "inf" if v == math.inf else "-inf" if v == -math.inf else f"{v:g}"

    left = "(" if lo_open or lo == -math.inf else "["
    right = ")" if hi_open or hi == math.inf else "]"
    return f"{left}{num(lo)}, {num(hi)}{right}"


def range_error(f: dataclasses.Field, value: Any) -> Optional[str]:
    """Why ``value`` violates the field's declared range, or ``None``; the message names the allowed range."""
    bounds = f.metadata.get("range")
    if bounds is None or value is None:
        return None
    lo, hi, lo_open, hi_open = bounds
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if isinstance(v, float) and not math.isfinite(v):
            return f"must be finite, in {_interval(*bounds)}, got {short(value)}"
        low_ok = v > lo if lo_open else v >= lo
        high_ok = v < hi if hi_open else v <= hi
        if not (low_ok and high_ok):
            what = "each value must" if isinstance(value, (list, tuple)) else "must"
            return f"{what} be in {_interval(*bounds)}, got {short(value)}"
    if f.metadata.get("ordered") and any(a > b for a, b in zip(items, items[1:])):
        return f"must be in increasing order (low <= high), got {short(value)}"
    return None


def relation_errors(config: Any, lookup: Callable[[str], Any], prefix: str = "") -> list[str]:
    """Every violated ``at_most`` / ``at_least`` relation in ``config`` (a dataclass tree), as ``'key' must be ...``."""
    errors = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            errors += relation_errors(value, lookup, key + ".")
            continue
        for relation, ok in (("at_most", lambda a, b: a <= b), ("at_least", lambda a, b: a >= b)):
            other = f.metadata.get(relation)
            if other is None or value is None:
                continue
            bound = lookup(other)
            if bound is not None and not ok(value, bound):
                errors.append(f"'{key}' must be {relation.replace('_', ' ')} '{other}' ({bound!r}), got {short(value)}")
    return errors
