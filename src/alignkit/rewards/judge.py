"""``judge:...`` rewards: an LLM judge's scalar score as the reward.

Specs:

- ``judge:TEMPLATE``: a shipped template (``quality``, ``toxicity``) or a template
  file, judged by the built-in model on this machine;
- ``judge:TEMPLATE@MODEL``: judged by another local model (hub id, folder,
  ``builtin:...``, ``tiny:...``), e.g. ``judge:toxicity@runs/big/sft/final``;
- a mapping ``{judge: {template: toxicity, backend: openai, base_url: ...,
  model: {name: gpt-4o-mini}}}`` with any :class:`~alignkit.judges.JudgeConfig`
  field, for endpoints and non-default parsing or caching.

The score is on the template's own scale (``toxicity``: -5 .. +5, higher is less
toxic). Unparsable answers get the judge's fallback and are counted:
``reward.stats`` holds the running counts and ``reward.metrics()`` the share per
call, for the recipe's log.
"""

from __future__ import annotations

import numpy as np

from alignkit.config import build
from alignkit.errors import ConfigError
from alignkit.judges import JudgeConfig, ScalarJudge, build_judge
from alignkit.rewards import Messages, check_scores, register, register_mapping


class JudgeReward:
    def __init__(self, judge: ScalarJudge, name: str):
        if not isinstance(judge, ScalarJudge):
            raise ConfigError(f"reward '{name}': template '{judge.template.name}' is pairwise; "
                              f"a reward needs a scalar template (quality, toxicity, or your own)")
        self.judge = judge
        self.name = name
        self._last: dict = {}

    @property
    def stats(self):
        return self.judge.stats

    def __call__(self, prompts: list[Messages], responses: list[str]) -> np.ndarray:
        verdicts = self.judge.judge(prompts, responses)
        n = max(len(verdicts), 1)
        self._last = {"judge_unparsable": sum(v.status == "unparsable" for v in verdicts) / n,
                      "judge_out_of_range": sum(v.status == "out_of_range" for v in verdicts) / n}
        return check_scores(self.name, [v.score for v in verdicts], len(responses))

    def metrics(self) -> dict[str, float]:
        """Shares of the last call's answers that were unparsable / out of range (fallback applied)."""
        return dict(self._last)


@register("judge")
def _judge(arg: str, **ctx) -> JudgeReward:
    template, _, model = arg.partition("@")
    cfg = JudgeConfig(template=template or "quality")
    if model:
        cfg.model.name = model
    return JudgeReward(build_judge(cfg, device=ctx.get("device")), f"judge:{arg}")


@register_mapping("judge")
def _judge_mapping(value, **ctx) -> JudgeReward:
    if isinstance(value, str):
        return _judge(value, **ctx)
    cfg = build(JudgeConfig, value, "reward spec", "judge.")
    return JudgeReward(build_judge(cfg, device=ctx.get("device")), f"judge:{cfg.template}@{cfg.model.name}")
