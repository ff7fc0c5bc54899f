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
import itertools
import math
import os
from dataclasses import field
from typing import Any, Callable, Optional

from hafis.errors import short

__all__ = ["MAX_SEED", "NULL_WORDS", "PerCPU", "choice", "registry", "RegistryNames", "bounded", "positive", "nonneg",
           "unit", "seed_value", "runtime", "range_error", "number_error", "relation_errors", "is_runtime",
           "show_choices"]

#: the largest seed: ``torch.manual_seed`` takes up to 2^64 - 1 (numpy's ``default_rng`` any non-negative int), and
#: the streams add small offsets to a seed (``seed + 1``, ``seed + epoch``, ``seed + rank``), so seeds stay below 2^63
MAX_SEED = 2**63 - 1
#: how a YAML file (``null``, ``~``) or a command line (``none``, ``null``) spells "no value"; YAML reads ``null`` and
#: ``~`` itself, the others arrive as strings and mean ``None`` for a key that may be null and is not a path
NULL_WORDS = ("none", "null", "~")


class PerCPU:
    """An upper bound of ``factor`` x this machine's CPU cores (worker, process and thread counts)."""

    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __float__(self) -> float:
        return float(self.factor * (os.cpu_count() or 1))

    def __str__(self) -> str:
        return f"{self.factor} x the {os.cpu_count() or 1} CPU cores here"

    def __repr__(self) -> str:
        return f"PerCPU({self.factor})"


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


def bounded(default: Any, lo: float = -math.inf, hi: Any = math.inf, *, lo_open: bool = False,
            hi_open: bool = False, at_most: Optional[str] = None, at_least: Optional[str] = None,
            ordered: bool = False, runtime: bool = False) -> Any:
    """A numeric key (or each element of a numeric tuple / list) in ``[lo, hi]`` (``lo_open`` / ``hi_open`` exclude
    the ends; ``hi`` may be a :class:`PerCPU`); ``at_most`` / ``at_least`` name another key (dotted, from the top) it
    is compared with, ``ordered`` makes a tuple non-decreasing (a low <= high pair). ``None`` of an optional key is
    always allowed."""
    meta = {"range": (lo, hi, lo_open, hi_open), "at_most": at_most, "at_least": at_least, "ordered": ordered}
    return _field(default, meta, runtime)


def positive(default: Any, hi: Any = math.inf, **relations: Any) -> Any:
    """> 0 (and at most ``hi``): sizes, counts, intervals, learning rates."""
    return bounded(default, 0, hi, lo_open=True, **relations)


def nonneg(default: Any, hi: Any = math.inf, **relations: Any) -> Any:
    """>= 0 (and at most ``hi``): loss weights, optional counts where 0 means "none"."""
    return bounded(default, 0, hi, **relations)


def seed_value(default: Any, **relations: Any) -> Any:
    """A seed: in [0, :data:`MAX_SEED`]."""
    return bounded(default, 0, MAX_SEED, **relations)


def unit(default: Any, **relations: Any) -> Any:
    """In [0, 1]: probabilities, confidence thresholds, EMA decays."""
    return bounded(default, 0, 1, **relations)


def runtime(default: Any) -> Any:
    """A key that changes how a run is executed or reported, not what it trains: it may change on resume."""
    return _field(default, {}, True)


def is_runtime(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("runtime"))


def _interval(lo: float, hi: Any, lo_open: bool, hi_open: bool) -> str:
    def num(v: Any) -> str:
        v = float(v) if isinstance(v, PerCPU) else v
        if v in (math.inf, -math.inf):
            return "inf" if v > 0 else "-inf"
        return str(v) if isinstance(v, int) else f"{v:g}"

    left = "(" if lo_open or lo == -math.inf else "["
    right = ")" if hi_open or hi == math.inf else "]"
    note = f" ({hi})" if isinstance(hi, PerCPU) else ""
    return f"{left}{num(lo)}, {num(hi)}{right}{note}"


def _outside(v: Any, lo: float, hi: Any, lo_open: bool, hi_open: bool) -> bool:
    top = float(hi) if isinstance(hi, PerCPU) else hi
    return not ((v > lo if lo_open else v >= lo) and (v < top if hi_open else v <= top))


def number_error(value: Any, lo: float = -math.inf, hi: Any = math.inf, lo_open: bool = False,
                 hi_open: bool = False) -> Optional[str]:
    """Why the number ``value`` is outside the range (as :func:`bounded` declares one), or ``None``: the check of a
    command-line option that has no config key."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be finite, in {_interval(lo, hi, lo_open, hi_open)}, got {short(value)}"
    if _outside(value, lo, hi, lo_open, hi_open):
        return f"must be in {_interval(lo, hi, lo_open, hi_open)}, got {short(value)}"
    return None


def range_error(f: dataclasses.Field, value: Any) -> Optional[str]:
    """Why ``value`` violates the field's declared range, or ``None``; the message names the allowed range."""
    bounds = f.metadata.get("range")
    if bounds is None or value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if isinstance(v, float) and not math.isfinite(v):
            return f"must be finite, in {_interval(*bounds)}, got {short(value)}"
        if _outside(v, *bounds):
            what = "each value must" if isinstance(value, (list, tuple)) else "must"
            return f"{what} be in {_interval(*bounds)}, got {short(value)}"
    if f.metadata.get("ordered") and any(a > b for a, b in itertools.pairwise(items)):
        return f"must be in increasing order (low <= high), got {short(value)}"
    return None


def show_choices(choices: Any) -> str:
    """The allowed values as a YAML user writes them: ``[null, 'imagenet', 'dinov2']``."""
    return "[" + ", ".join("null" if c is None else repr(c) for c in choices) + "]"


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
