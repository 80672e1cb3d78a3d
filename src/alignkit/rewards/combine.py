"""Combining rewards: a weighted mean of normalised scores, or Llama 2's safety gate.

Weighted mean (each source normalised first, so that a reward in [0, 1] and a
reward-model logit with spread 5 weigh what their weights say)::

    {"weighted": [{"reward": "rm:runs/helpful/rm", "weight": 0.7},
                  {"reward": "profanity", "weight": 0.3}],
     "normalize": "auto"}

    score = sum_i w_i * z_i / sum_i w_i

Gated (Touvron et al. 2023, Llama 2, sec. 3.2.2): the safety score where the
prompt is tagged unsafe or the response looks unsafe, else the helpfulness score::

    {"gated": {"safety": "rm:runs/safety/rm", "helpfulness": "rm:runs/helpful/rm",
               "threshold": 0.15, "unsafe_kinds": ["red_team"]},
     "normalize": "auto"}

    use safety  if kind(prompt) in unsafe_kinds or P_safe(response) < threshold
    score = z_safety if use safety else z_helpfulness

``P_safe`` is on the probability scale: sigmoid of a reward model's raw score
(the Bradley-Terry probability Llama 2 thresholds), or the score itself for a
reward that already is a probability (``profanity``: 1 - P(offensive));
``safety_scale: logit | probability`` forces one reading.

``normalize`` (both kinds): ``auto`` (default) uses a source's stored statistics
where it has them (``rm:`` models trained by ``alignkit rm``: (s - mean) / std)
and a z-score over the scored batch otherwise; ``stored`` requires stored
statistics; ``batch`` always z-scores over the batch; ``none`` keeps raw scores.
A batch z-score depends on the other responses of the batch: it suits PPO's
large rollout batches, not scoring one response alone (it gives 0).

Prompt tags: combined rewards are called as ``fn(prompts, responses, kinds=None)``;
``kinds[i]`` is the tag of prompt i (``PromptExample.kind``: ``helpful``,
``red_team``), None when untagged. Sources that do not take ``kinds`` are
called without it (:func:`call_reward`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np

from alignkit.errors import AlignkitError
from alignkit.rewards import Messages, RewardFn, build_reward, check_scores, register_mapping

NORMALIZE_MODES = ("auto", "stored", "batch", "none")
SAFETY_SCALES = ("auto", "logit", "probability")
_EPS = 1e-8


def call_reward(fn, prompts: list[Messages], responses: list[str], kinds: Sequence | None = None) -> np.ndarray:
    """Call any RewardFn, passing ``kinds`` only to those that accept it."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    takes_kinds = "kinds" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    scores = fn(prompts, responses, kinds=kinds) if takes_kinds and kinds is not None else fn(prompts, responses)
    return check_scores(getattr(fn, "name", repr(fn)), scores, len(responses))


def batch_zscore(scores: np.ndarray) -> np.ndarray:
    """(s - mean) / std over the batch; a constant batch gives zeros."""
    scores = np.asarray(scores, dtype=np.float64)
    std = scores.std()
    return (scores - scores.mean()) / std if std > _EPS else scores - scores.mean()


def _has_stats(fn) -> bool:
    return bool(getattr(fn, "has_stats", False)) and hasattr(fn, "normalized_scores")


def normalized(fn, prompts, responses, kinds, mode: str) -> np.ndarray:
    """One source's scores under a ``normalize`` mode (see the module docstring)."""
    if mode in ("auto", "stored") and _has_stats(fn):
        return check_scores(fn.name, fn.normalized_scores(prompts, responses), len(responses))
    if mode == "stored":
        raise AlignkitError(f"reward '{fn.name}' has no stored normalisation statistics "
                            f"(normalize: stored needs rm: models trained by alignkit rm); use auto or batch")
    scores = call_reward(fn, prompts, responses, kinds)
    return scores if mode == "none" else batch_zscore(scores)


def safety_probability(fn, prompts, responses, kinds, scale: str) -> np.ndarray:
    """P(safe) per response: sigmoid of a logit-scale score, or a probability as is."""
    if scale == "auto":
        scale = "logit" if hasattr(fn, "probability") else "probability"
    if scale == "logit":
        if hasattr(fn, "probability"):
            return np.asarray(fn.probability(prompts, responses), dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-call_reward(fn, prompts, responses, kinds)))
    p = call_reward(fn, prompts, responses, kinds)
    if ((p < 0) | (p > 1)).any():
        raise AlignkitError(f"gated reward: safety reward '{fn.name}' gave {p[(p < 0) | (p > 1)][0]:.4g}, not a "
                            f"probability in [0, 1]; set safety_scale: logit to read its scores as logits")
    return p


def _check_choice(what: str, value, choices: tuple) -> str:
    if value not in choices:
        raise AlignkitError(f"{what} must be one of {', '.join(choices)}; got {value!r}")
    return value


class WeightedReward:
    """Weighted mean of normalised source scores."""

    def __init__(self, sources: list[RewardFn], weights: list[float], normalize: str = "auto"):
        self.sources, self.weights = sources, np.asarray(weights, dtype=np.float64)
        self.normalize = _check_choice("weighted reward: normalize", normalize, NORMALIZE_MODES)
        parts = ", ".join(f"{w:g}*{s.name}" for s, w in zip(sources, weights))
        self.name = f"weighted({parts})"

    def __call__(self, prompts: list[Messages], responses: list[str], kinds: Sequence | None = None) -> np.ndarray:
        z = np.stack([normalized(s, prompts, responses, kinds, self.normalize) for s in self.sources])
        return check_scores(self.name, self.weights @ z / self.weights.sum(), len(responses))


class GatedReward:
    """Llama 2's rule: the safety score for unsafe prompts or unsafe-looking responses, else helpfulness."""

    def __init__(self, safety: RewardFn, helpfulness: RewardFn, threshold: float = 0.15,
                 unsafe_kinds: Sequence[str] = ("red_team",), normalize: str = "auto", safety_scale: str = "auto"):
        if not 0.0 <= threshold <= 1.0:
            raise AlignkitError(f"gated reward: threshold is a probability in [0, 1], got {threshold}")
        self.safety, self.helpfulness, self.threshold = safety, helpfulness, float(threshold)
        self.unsafe_kinds = frozenset(unsafe_kinds)
        self.normalize = _check_choice("gated reward: normalize", normalize, NORMALIZE_MODES)
        self.safety_scale = _check_choice("gated reward: safety_scale", safety_scale, SAFETY_SCALES)
        self.name = f"gated(safety={safety.name}, helpfulness={helpfulness.name}, threshold={threshold:g})"
        self.last_gate: np.ndarray | None = None  # True where the last call used the safety score

    def gate(self, prompts, responses, kinds=None) -> np.ndarray:
        """True where the safety score is used."""
        if kinds is not None and len(kinds) != len(prompts):
            raise AlignkitError(f"reward '{self.name}': {len(kinds)} kinds for {len(prompts)} prompts")
        tagged = np.array([k in self.unsafe_kinds for k in kinds] if kinds is not None else [False] * len(prompts),
                          dtype=bool)
        p_safe = safety_probability(self.safety, prompts, responses, kinds, self.safety_scale)
        return tagged | (p_safe < self.threshold)

    def __call__(self, prompts: list[Messages], responses: list[str], kinds: Sequence | None = None) -> np.ndarray:
        use_safety = self.gate(prompts, responses, kinds)
        z_safety = normalized(self.safety, prompts, responses, kinds, self.normalize)
        z_helpful = normalized(self.helpfulness, prompts, responses, kinds, self.normalize)
        self.last_gate = use_safety
        return check_scores(self.name, np.where(use_safety, z_safety, z_helpful), len(responses))


def _source_ctx(ctx: dict) -> dict:
    """The context passed down to sources, without this module's own options."""
    return {k: v for k, v in ctx.items() if k not in ("normalize", "safety_scale")}


@register_mapping("weighted", options=("normalize",))
def _weighted(value, normalize: str = "auto", **ctx) -> WeightedReward:
    if not isinstance(value, list) or not value:
        raise AlignkitError("weighted reward: give a non-empty list of {reward: SPEC, weight: W}")
    sources, weights = [], []
    for i, item in enumerate(value):
        if isinstance(item, str):
            item = {"reward": item}
        if not isinstance(item, dict) or "reward" not in item:
            raise AlignkitError(f"weighted reward: item {i} must be {{reward: SPEC, weight: W}}, got {item!r}")
        extra = sorted(set(item) - {"reward", "weight"})
        if extra:
            raise AlignkitError(f"weighted reward: item {i} has unknown key(s) {', '.join(extra)}")
        w = item.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0:
            raise AlignkitError(f"weighted reward: item {i} weight must be a number >= 0, got {w!r}")
        sources.append(build_reward(item["reward"], **_source_ctx(ctx)))
        weights.append(float(w))
    if sum(weights) <= 0:
        raise AlignkitError("weighted reward: the weights sum to 0")
    if not np.isfinite(sum(weights)):  # each finite, their sum not: every score would be inf / inf
        raise AlignkitError(f"weighted reward: the weights sum past the float range ({weights}); scale them down")
    return WeightedReward(sources, weights, normalize)


@register_mapping("gated", options=("normalize", "safety_scale"))
def _gated(value, normalize: str = "auto", **ctx) -> GatedReward:
    if not isinstance(value, dict) or "safety" not in value or "helpfulness" not in value:
        raise AlignkitError("gated reward: give {safety: SPEC, helpfulness: SPEC, threshold: 0.15, "
                            "unsafe_kinds: [red_team]}")
    known = {"safety", "helpfulness", "threshold", "unsafe_kinds", "safety_scale"}
    extra = sorted(set(value) - known)
    if extra:
        raise AlignkitError(f"gated reward: unknown key(s) {', '.join(extra)}; known: {', '.join(sorted(known))}")
    threshold = value.get("threshold", 0.15)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise AlignkitError(f"gated reward: threshold must be a number, got {threshold!r}")
    kinds = value.get("unsafe_kinds", ["red_team"])
    if isinstance(kinds, str):
        kinds = [kinds]
    if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
        raise AlignkitError(f"gated reward: unsafe_kinds must be a list of prompt kinds, got {kinds!r}")
    sub = _source_ctx(ctx)
    return GatedReward(build_reward(value["safety"], **sub), build_reward(value["helpfulness"], **sub),
                       float(threshold), kinds, normalize, value.get("safety_scale", ctx.get("safety_scale", "auto")))
