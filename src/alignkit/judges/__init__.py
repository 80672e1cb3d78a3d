"""LLM judges for AI feedback (RLAIF): templates, answer parsing, a verdict cache, backends.

    from alignkit.judges import JudgeConfig, build_judge

    judge = build_judge(JudgeConfig(template="toxicity"))          # the built-in model, locally
    judge.score(prompts, responses)                                  # -> np.ndarray on -5..+5

    pair = build_judge(JudgeConfig(template="pairwise", mode="logprob"))
    pair.compare(prompts, responses_a, responses_b)                  # -> [PairVerdict], both orders asked

``judge:TEMPLATE`` is also a reward spec (:mod:`alignkit.rewards.judge`).
"""

from alignkit.judges.backends import EndpointBackend, LocalBackend
from alignkit.judges.cache import VerdictCache, cache_key
from alignkit.judges.judge import (JudgeConfig, JudgeStats, PairVerdict, PairwiseJudge, ScalarJudge, ScalarVerdict,
                                   build_backend, build_judge)
from alignkit.judges.parsing import parse_choice, parse_score
from alignkit.judges.template import Template, load_template, shipped_templates

__all__ = ["EndpointBackend", "JudgeConfig", "JudgeStats", "LocalBackend", "PairVerdict", "PairwiseJudge",
           "ScalarJudge", "ScalarVerdict", "Template", "VerdictCache", "build_backend", "build_judge", "cache_key",
           "load_template", "parse_choice", "parse_score", "shipped_templates"]
