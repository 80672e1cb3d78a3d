"""Rewards that need no trained model: the offensive-language classifier, rules, Python functions."""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

import numpy as np

from alignkit.config import build, opt
from alignkit.errors import AlignkitError
from alignkit.rewards import Messages, check_scores, register


class ProfanityReward:
    """1 - P(offensive) under ``alt-profanity-check`` (a linear SVM on TF-IDF, ~160k strings/s).

    >>> r = ProfanityReward()
    >>> s = r([[{"role": "user", "content": "hi"}]] * 2, ["Have a lovely day.", "Shut up, you stupid idiot."])
    >>> bool(s[0] > 0.5 > s[1])
    True
    """

    name = "profanity"

    def __init__(self):
        try:
            from profanity_check import predict_prob
        except ImportError:
            raise AlignkitError("the 'profanity' reward needs alt-profanity-check (pip install alt-profanity-check)") from None
        self._predict_prob = predict_prob

    def offensive_probability(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        return np.asarray(self._predict_prob(list(texts)), dtype=np.float64)

    def __call__(self, prompts: list[Messages], responses: list[str]) -> np.ndarray:
        return check_scores(self.name, 1.0 - self.offensive_probability(responses), len(responses))


def no_argument(kind: str, arg: str) -> None:
    """A spec kind that takes nothing after its name: ``profanity:x`` is a typo, not an option to ignore."""
    if arg:
        raise AlignkitError(f"reward '{kind}:{arg}': '{kind}' takes no argument; write '{kind}'")


@register("profanity")
def _profanity(arg: str = "", **ctx):
    no_argument("profanity", arg)
    return ProfanityReward()


_WORD = re.compile(r"\w+|[^\w\s]")


class TokenShareReward:
    """The share of a response's words that equal ``word`` (a learnable toy objective).

    >>> TokenShareReward("yes")([[]] * 2, ["yes yes no", "no"]).round(3).tolist()
    [0.667, 0.0]
    """

    def __init__(self, word: str):
        if not word:
            raise AlignkitError("rule:token_share needs a word, e.g. rule:token_share:yes")
        self.word = word.lower()
        self.name = f"rule:token_share:{word}"

    def __call__(self, prompts, responses):
        out = []
        for text in responses:
            words = _WORD.findall(text.lower())
            out.append(sum(w == self.word for w in words) / len(words) if words else 0.0)
        return check_scores(self.name, out, len(responses))


@dataclass
class _LengthArgs:
    target: float = opt(50.0, gt=0, help="words for a full score")


def rule_args(cls: type, spec: str, values: dict):
    """The numbers of a rule spec, checked like a config's keys (finite, in range) by
    :func:`alignkit.config.build`; an error names the spec: ``reward 'rule:length:nan': 'target' must be ...``."""
    return build(cls, values, f"reward '{spec}'")


class LengthReward:
    """Response length in words divided by ``target``, capped at 1.

    >>> LengthReward("4")([[]] * 2, ["a b", "a b c d e"]).tolist()
    [0.5, 1.0]
    """

    def __init__(self, target: str = "50"):
        self.target = rule_args(_LengthArgs, f"rule:length:{target}", {"target": target or 50.0}).target
        self.name = f"rule:length:{self.target:g}"

    def __call__(self, prompts, responses):
        return check_scores(self.name, [min(len(t.split()) / self.target, 1.0) for t in responses], len(responses))


_RULES = {"token_share": TokenShareReward, "length": LengthReward}


@register("rule")
def _rule(arg: str, **ctx):
    name, _, rest = arg.partition(":")
    if name not in _RULES:
        raise AlignkitError(f"unknown rule reward 'rule:{arg}'; known: {', '.join('rule:' + k for k in _RULES)}")
    if name == "token_share" and not rest:
        raise AlignkitError(f"reward 'rule:{arg}' needs a word, e.g. rule:token_share:yes")
    return _RULES[name](rest) if rest else _RULES[name]()


class PythonReward:
    """``python:package.module:function``; the function takes (prompts, responses) -> scores."""

    def __init__(self, target: str):
        mod_name, _, fn_name = target.rpartition(":")
        if not mod_name or not fn_name:
            raise AlignkitError(f"python reward '{target}' must look like python:package.module:function")
        try:
            self.fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise AlignkitError(f"python reward '{target}': {e}") from None
        if not callable(self.fn):  # found when built, not when the first batch is scored
            raise AlignkitError(f"python reward '{target}': {fn_name} is a {type(self.fn).__name__}, not a function "
                                f"(prompts, responses) -> scores")
        self.name = f"python:{target}"

    def __call__(self, prompts, responses):
        return check_scores(self.name, self.fn(prompts, responses), len(responses))


@register("python")
def _python(arg: str, **ctx):
    return PythonReward(arg)
