"""Rewards: anything that gives one score per (prompt, response).

A :class:`RewardFn` is called as ``fn(prompts, responses) -> np.ndarray (B,)``
with prompts as chat messages. Recipes build them from a *spec*, a string or a
mapping in the config (see :func:`build_reward`):

- ``profanity``: the built-in ``alt-profanity-check`` classifier, 1 - P(offensive);
- ``rule:NAME[:ARG]``: small rule rewards (``rule:token_share:WORD``, ``rule:length``);
- ``python:module:function``: your own ``function(prompts, responses) -> list[float]``;
- other prefixes (``rm:``, ``classifier:``, ``judge:``) and mappings (weighted
  or gated combinations) are registered by their modules.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from alignkit.errors import AlignkitError

Messages = list[dict]


@runtime_checkable
class RewardFn(Protocol):
    name: str

    def __call__(self, prompts: list[Messages], responses: list[str]) -> np.ndarray: ...


_FACTORIES: dict[str, Callable[..., RewardFn]] = {}
_MAPPING_FACTORIES: dict[str, Callable[..., RewardFn]] = {}
_MAPPING_OPTIONS: dict[str, tuple[str, ...]] = {}  # the keys a mapping spec takes beside its own
# Modules that register more spec kinds when imported.
_PLUGINS = ("alignkit.rewards.builtin", "alignkit.rewards.model", "alignkit.rewards.combine",
            "alignkit.rewards.classifier", "alignkit.rewards.judge", "alignkit.eval.helpfulness")


def register(prefix: str):
    """Register ``factory(arg: str, **ctx) -> RewardFn`` for specs ``prefix:arg``."""
    def deco(factory):
        _FACTORIES[prefix] = factory
        return factory
    return deco


def register_mapping(key: str, options: tuple[str, ...] = ()):
    """Register ``factory(value, **ctx) -> RewardFn`` for mapping specs ``{key: value, OPTION: ...}``;
    ``options`` are the other keys such a mapping may hold (``normalize``): any other is a typo."""
    def deco(factory):
        _MAPPING_FACTORIES[key] = factory
        _MAPPING_OPTIONS[key] = tuple(options)
        return factory
    return deco


def _load_plugins() -> None:
    for mod in _PLUGINS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def build_reward(spec: Any, **ctx) -> RewardFn:
    """Build a RewardFn from a spec string or mapping (see the module docstring)."""
    _load_plugins()
    if isinstance(spec, dict):
        keys = [k for k in spec if k in _MAPPING_FACTORIES]
        if len(keys) != 1:
            raise AlignkitError(f"reward spec {spec!r}: use exactly one of {', '.join(sorted(_MAPPING_FACTORIES))}")
        # An unknown key beside it (``normalise:``) would reach the factory as context and be ignored.
        extra = sorted(str(k) for k in spec if k != keys[0] and k not in _MAPPING_OPTIONS[keys[0]])
        if extra:
            known = ", ".join(_MAPPING_OPTIONS[keys[0]]) or "none"
            raise AlignkitError(f"reward spec {spec!r}: unknown key(s) {', '.join(extra)} beside "
                                f"'{keys[0]}' (its options: {known})")
        return _MAPPING_FACTORIES[keys[0]](spec[keys[0]], **{**ctx, **{k: v for k, v in spec.items() if k != keys[0]}})
    if not isinstance(spec, str) or not spec:
        raise AlignkitError(f"reward spec must be a string or mapping, got {spec!r}")
    prefix, _, arg = spec.partition(":")
    if prefix not in _FACTORIES:
        raise AlignkitError(f"unknown reward '{spec}'; known kinds: {', '.join(sorted(_FACTORIES))}")
    return _FACTORIES[prefix](arg, **ctx)


def _is_number(x: Any) -> bool:
    # a real number (int, float, numpy's, a 0-d tensor: anything float() reads), not text and not a bool
    return hasattr(type(x), "__float__") and not isinstance(x, (bool, np.bool_, str, bytes))


def check_scores(name: str, scores: Any, n: int) -> np.ndarray:
    """Scores as float64 (B,); a wrong count, a value that is not a number (text such as '0.5',
    True/False, None) or a non-finite one is an error, never a zero or a silent conversion."""
    try:
        raw = np.asarray(scores)
    except Exception:  # noqa: BLE001 - an object numpy cannot read at all
        raw = np.asarray(None, dtype=object)
    # A list is checked item by item (numpy would turn [True, 0.5] into floats); so is an
    # array that is not numeric (text, bools, objects).
    if isinstance(scores, (list, tuple)) or raw.dtype.kind not in "iuf":
        items = list(scores) if isinstance(scores, (list, tuple)) else raw.reshape(-1).tolist() if raw.ndim \
            else [scores]
        bad = next(((i, x) for i, x in enumerate(items) if not _is_number(x)), None)
        if bad is not None:
            _not_a_number(name, *bad)
        raw = np.asarray([float(x) for x in items], dtype=np.float64)
    arr = raw.astype(np.float64).reshape(-1)
    if arr.shape[0] != n:
        raise AlignkitError(f"reward '{name}' returned {arr.shape[0]} scores for {n} responses")
    bad_at = np.flatnonzero(~np.isfinite(arr))
    if bad_at.size:
        raise AlignkitError(f"reward '{name}' returned a non-finite score for response {int(bad_at[0])}")
    return arr


def _not_a_number(name: str, i: int, x: Any) -> None:
    shown = " ".join(repr(x).split())  # one line, however the value prints
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise AlignkitError(f"reward '{name}' returned {shown} ({type(x).__name__}) for response {i}; a reward "
                        f"returns one number (int or float) per response")
