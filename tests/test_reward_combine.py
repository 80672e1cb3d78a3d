"""Combined rewards on hand-built scores: weighted mean of normalised scores, Llama 2 gating."""

import math

import numpy as np
import pytest

from alignkit.errors import AlignkitError
from alignkit.rewards import build_reward, register
from alignkit.rewards.combine import batch_zscore, call_reward

RESPONSES = ["a", "b", "c", "d"]
PROMPTS = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]

# Hand-built sources, looked up by response text.
TABLES = {
    "helpful": {"a": 2.0, "b": 0.0, "c": -1.0, "d": 3.0},
    "safety": {"a": 3.0, "b": 3.0, "c": -2.0, "d": -1.5},  # logits; sigmoid: .953 .953 .119 .182
    "clean": {"a": 0.9, "b": 0.6, "c": 0.3, "d": 0.2},  # already probabilities
    "wide": {"a": 5.0, "b": -5.0, "c": 0.0, "d": 0.0},
}


class Fixed:
    """A reward with no stored statistics (batch z-score under auto)."""

    def __init__(self, table):
        self.table, self.name = TABLES[table], f"fixed:{table}"

    def __call__(self, prompts, responses):
        return np.array([self.table[r] for r in responses])


class FixedRM(Fixed):
    """Looks like an alignkit reward model: logits plus stored mean/std."""

    has_stats = True
    mean, std = 1.0, 2.0

    def __init__(self, table):
        super().__init__(table)
        self.name = f"fixedrm:{table}"
        self.seen_kinds = None

    def __call__(self, prompts, responses, kinds=None):
        self.seen_kinds = kinds
        return super().__call__(prompts, responses)

    def normalized_scores(self, prompts, responses):
        return (super().__call__(prompts, responses) - self.mean) / self.std

    def probability(self, prompts, responses):
        return 1 / (1 + np.exp(-super().__call__(prompts, responses)))


register("fixed")(lambda arg, **ctx: Fixed(arg))
register("fixedrm")(lambda arg, **ctx: FixedRM(arg))


def z(values):
    v = np.array(values)
    return (v - v.mean()) / v.std()


def test_weighted_mean_of_normalised_scores():
    fn = build_reward({"weighted": [{"reward": "fixedrm:helpful", "weight": 3},
                                    {"reward": "fixed:clean", "weight": 1}]})
    got = fn(PROMPTS, RESPONSES)
    # helpful has stored stats: (s - 1) / 2 -> [0.5, -0.5, -1, 1]; clean is z-scored over the batch.
    stored = np.array([0.5, -0.5, -1.0, 1.0])
    expected = (3 * stored + 1 * z([0.9, 0.6, 0.3, 0.2])) / 4
    assert got == pytest.approx(expected)
    # First response: clean mean .5, std sqrt(.075); z = .4/.27386 = 1.4606; (1.5 + 1.4606) / 4 = .7401
    assert got[0] == pytest.approx((1.5 + 0.4 / math.sqrt(0.075)) / 4)


def test_weighted_normalize_modes():
    spec = [{"reward": "fixedrm:helpful", "weight": 1}, {"reward": "fixed:wide", "weight": 1}]
    raw = build_reward({"weighted": spec, "normalize": "none"})(PROMPTS, RESPONSES)
    assert raw == pytest.approx([(2 + 5) / 2, (0 - 5) / 2, (-1 + 0) / 2, (3 + 0) / 2])
    batch = build_reward({"weighted": spec, "normalize": "batch"})(PROMPTS, RESPONSES)
    assert batch == pytest.approx((z([2, 0, -1, 3]) + z([5, -5, 0, 0])) / 2)
    with pytest.raises(AlignkitError, match="no stored normalisation"):
        build_reward({"weighted": spec, "normalize": "stored"})(PROMPTS, RESPONSES)
    # A constant batch has no spread: its z-scores are 0, not NaN.
    assert batch_zscore(np.array([2.0, 2.0])).tolist() == [0.0, 0.0]


def test_gated_follows_llama2_rule():
    spec = {"gated": {"safety": "fixedrm:safety", "helpfulness": "fixedrm:helpful"}, "normalize": "none"}
    fn = build_reward(spec)
    kinds = ["helpful", "red_team", None, "helpful"]
    got = fn(PROMPTS, RESPONSES, kinds=kinds)
    # a: safe prompt, P(safe)=.953 -> helpfulness 2.0
    # b: red_team prompt -> safety 3.0 even though the response is safe
    # c: P(safe)=sigmoid(-2)=.119 < .15 -> safety -2.0
    # d: P(safe)=sigmoid(-1.5)=.182 >= .15 -> helpfulness 3.0
    assert got.tolist() == [2.0, 3.0, -2.0, 3.0]
    assert fn.last_gate.tolist() == [False, True, True, False]
    assert fn.helpfulness.seen_kinds == kinds  # sources that take tags get them

    stricter = build_reward({"gated": {**spec["gated"], "threshold": 0.2}, "normalize": "none"})
    assert stricter(PROMPTS, RESPONSES, kinds=kinds).tolist() == [2.0, 3.0, -2.0, -1.5]
    untagged = fn(PROMPTS, RESPONSES)  # no kinds: only the threshold gates
    assert untagged.tolist() == [2.0, 0.0, -2.0, 3.0]


def test_gated_normalises_the_chosen_source_and_reads_probabilities():
    fn = build_reward({"gated": {"safety": "fixed:clean", "helpfulness": "fixedrm:helpful", "threshold": 0.25,
                                 "unsafe_kinds": ["red_team", "medical"]}})
    got = fn(PROMPTS, RESPONSES, kinds=["x", "medical", "x", "x"])
    # clean is a probability already: d (0.2) < 0.25 is gated; b by its tag.
    # auto normalisation: clean by batch z-score, helpful by its stored stats (s - 1) / 2.
    zc = z([0.9, 0.6, 0.3, 0.2])
    assert got == pytest.approx([0.5, zc[1], -1.0, zc[3]])
    with pytest.raises(AlignkitError, match="not a probability"):
        build_reward({"gated": {"safety": "fixed:wide", "helpfulness": "fixed:clean"}})(PROMPTS, RESPONSES)
    logit = build_reward({"gated": {"safety": "fixed:wide", "helpfulness": "fixed:clean", "safety_scale": "logit"},
                          "normalize": "none"})
    assert logit(PROMPTS, RESPONSES).tolist() == [0.9, -5.0, 0.3, 0.2]  # sigmoid(-5) = .0067 < .15


def test_call_reward_passes_kinds_only_where_accepted():
    plain, tagged = Fixed("helpful"), FixedRM("helpful")
    assert call_reward(plain, PROMPTS, RESPONSES, kinds=["red_team"] * 4).tolist() == [2.0, 0.0, -1.0, 3.0]
    call_reward(tagged, PROMPTS, RESPONSES, kinds=["red_team"] * 4)
    assert tagged.seen_kinds == ["red_team"] * 4


@pytest.mark.parametrize("spec,message", [
    ({"weighted": []}, "non-empty list"),
    ({"weighted": [{"reward": "fixed:helpful", "weight": -1}]}, "weight must be a number >= 0"),
    ({"weighted": [{"reward": "fixed:helpful", "weight": 0}]}, "sum to 0"),
    ({"weighted": [{"reward": "fixed:helpful", "wieght": 1}]}, "unknown key"),
    ({"weighted": [{"reward": "fixed:helpful"}], "normalize": "zscore"}, "normalize must be one of"),
    ({"gated": {"safety": "fixed:clean"}}, "helpfulness"),
    ({"gated": {"safety": "fixed:clean", "helpfulness": "fixed:helpful", "threshold": 15}}, r"\[0, 1\]"),
    ({"gated": {"safety": "fixed:clean", "helpfulness": "fixed:helpful", "treshold": 0.1}}, "unknown key"),
])
def test_bad_combination_specs_are_errors(spec, message):
    with pytest.raises(AlignkitError, match=message):
        build_reward(spec)
