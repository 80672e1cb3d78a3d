"""LLM judges: score/choice parsing on recorded answers, templates, fallbacks, swap logic, the cache,
the log-probability mode on a tiny model, and the judge: reward spec."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignkit.config import GenerationConfig, ModelConfig
from alignkit.errors import AlignkitError, ConfigError
from alignkit.judges import (JudgeConfig, LocalBackend, PairwiseJudge, build_judge, load_template,
                             parse_choice, parse_score, shipped_templates)
from alignkit.judges.template import parse_template

PROMPT = [{"role": "user", "content": "Say something about my neighbour."}]

# --------------------------------------------------------------------------- score parsing

# (answer as a model wrote it, low, high, expected value or None, expected status)
RECORDED = [
    # plain and decorated
    ("4.5", 1, 5, 4.5, "ok"),
    ("**Score:** 4.25", 1, 5, 4.25, "ok"),
    ("Score: 3.75/5", 1, 5, 3.75, "ok"),
    ("4 out of 5", 1, 5, 4.0, "ok"),
    # justification first, score last; the justification has its own numbers
    ("Justification: the answer lists 2 steps but misses 3 others.\nScore: 3", 1, 5, 3.0, "ok"),
    ("Score: 4.50\nJustification: it covers 3 of the 4 points.", 1, 5, 4.5, "ok"),
    # a labelled score beats a number in a sentence, whichever comes first
    ("Score: 4. A score of 5 would need more detail.", 1, 5, 4.0, "ok"),
    ("A score of 5 would need more detail. Final score: 2", 1, 5, 2.0, "ok"),
    ("I would give it a score of 3.", 1, 5, 3.0, "ok"),
    # the rubric's scale echoed back is not the answer
    ("On a scale of 1 to 5, this is a 2.", 1, 5, 2.0, "ok"),
    ("The rate should be between -5 (extreme toxicity) and +5 (low toxicity). I rate it -2.", -5, 5, -2.0, "ok"),
    # negative numbers, signs, the unicode minus
    ("-4", -5, 5, -4.0, "ok"),
    ("+5", -5, 5, 5.0, "ok"),
    ("Rating: -3 (fairly rude)", -5, 5, -3.0, "ok"),
    ("\u22123", -5, 5, -3.0, "ok"),
    # a range answer reads as its midpoint; "GPT-4" is not a score
    ("Score: 3-4", 1, 5, 3.5, "ok"),
    ("GPT-4 would say 2", 1, 5, 2.0, "ok"),
    # out of range: rejected by default (the fallback then applies)
    ("Score: 7", 1, 5, None, "out_of_range"),
    ("I'd give it 8/10", 1, 5, None, "out_of_range"),
    # garbage
    ("I cannot evaluate this response.", 1, 5, None, "unparsable"),
    ("", -5, 5, None, "unparsable"),
    ("pl hopelessse gr costs Keep", 1, 5, None, "unparsable"),
]


@pytest.mark.parametrize("text,low,high,value,status", RECORDED)
def test_parse_score_recorded_answers(text, low, high, value, status):
    got = parse_score(text, low, high)
    assert got.status == status
    assert got.value == value


def test_out_of_range_clamps_when_asked_and_keeps_the_raw_number():
    got = parse_score("Score: 7", 1, 5, out_of_range="clamp")
    assert (got.value, got.status, got.raw_value) == (5.0, "clamped", 7.0)
    got = parse_score("Rating: -9", -5, 5, out_of_range="clamp")
    assert (got.value, got.status) == (-5.0, "clamped")


CHOICES = [
    ("(A)", "A"), ("B", "B"), ("B.\nBecause it is kinder.", "B"), ("Answer: (B)", "B"),
    ("The better response is A.", "A"), ("(A) is better than (B)", "A"), ("Response B is more polite.", "B"),
    ("I prefer (A) over (B).", "A"), ("Both are equally good.", "tie"), ("Neither.", "tie"),
    # unparsable: both offered, contradictory, or the article "A"
    ("hmm (A) or (B)?", None), ("A is better. No wait, B is better.", None),
    ("A response that is kind is better.", None), ("", None),
]


@pytest.mark.parametrize("text,expected", CHOICES)
def test_parse_choice_recorded_answers(text, expected):
    assert parse_choice(text) == expected


# --------------------------------------------------------------------------- templates


def test_shipped_templates_load_with_their_scales():
    assert {"quality", "toxicity", "pairwise", "constitution"} <= set(shipped_templates())
    q, t, p = load_template("quality"), load_template("toxicity"), load_template("pairwise")
    assert (q.kind, q.low, q.high) == ("scalar", 1.0, 5.0)
    assert (t.kind, t.low, t.high) == ("scalar", -5.0, 5.0)
    assert p.kind == "pairwise" and p.options == ("(A)", "(B)") and p.guidelines
    user = p.render(prompt="Q?", response_a="first", response_b="second")[-1]["content"]
    assert user.index("first") < user.index("second") and p.guidelines[:30] in user


def test_user_template_file_placeholders_and_errors(tmp_path):
    good = tmp_path / "mine.txt"
    good.write_text("---\nkind: scalar\nmin: 0\nmax: 10\n---\nJSON like {{\"x\": 1}} stays.\nRate: {response}\n")
    t = load_template(str(good))
    assert t.render(response="hello")[-1]["content"] == 'JSON like {"x": 1} stays.\nRate: hello'
    bad = tmp_path / "bad.txt"
    bad.write_text("---\nkind: scalar\nmin: 0\nmax: 10\n---\nline one\nRate {answer}\n")
    with pytest.raises(AlignkitError, match=r"bad\.txt:7: unknown placeholder \{answer\}"):
        load_template(str(bad))
    with pytest.raises(AlignkitError, match="needs 'min'"):
        parse_template("---\nkind: scalar\n---\n{response}", "x", "x.txt")
    with pytest.raises(AlignkitError, match="neither a shipped template"):
        load_template("no_such_template")


# --------------------------------------------------------------------------- stub backends


class ScriptedBackend:
    """Answers from a function of the rendered question; counts the questions it gets."""

    def __init__(self, answer, id="stub"):
        self.answer, self.id, self.calls = answer, id, 0

    def complete(self, conversations, gen, seed=0):
        self.calls += len(conversations)
        return [self.answer(c[-1]["content"]) for c in conversations]

    def option_logprobs(self, conversations, options, prefix=""):
        self.calls += len(conversations)
        return [self.answer(c[-1]["content"]) for c in conversations]


def _cfg(tmp_path, **kw) -> JudgeConfig:
    return JudgeConfig(cache_dir=str(tmp_path / "cache"), **kw)


def test_unparsable_answers_get_the_fallback_and_are_counted(tmp_path):
    answers = {"a": "Score: 4", "b": "no idea", "c": "Score: 9", "d": "Rating: 2.5"}
    backend = ScriptedBackend(lambda q: answers[q.rsplit("\n", 1)[-1]])
    judge = build_judge(_cfg(tmp_path, template="quality"), backend=backend)
    verdicts = judge.judge([PROMPT] * 4, ["a", "b", "c", "d"])
    # midpoint of 1..5 is 3: given to the unparsable and the out-of-range answer, never 0
    assert [v.score for v in verdicts] == [4.0, 3.0, 3.0, 2.5]
    assert [v.fallback for v in verdicts] == [False, True, True, False]
    assert (judge.stats.unparsable, judge.stats.out_of_range) == (1, 1)
    assert "no idea" in judge.stats.examples
    for fallback, expected in (("min", 1.0), ("max", 5.0), ("2.25", 2.25)):
        j = build_judge(_cfg(tmp_path, template="quality", fallback=fallback), backend=backend)
        assert j.judge([PROMPT], ["b"])[0].score == expected
    strict = build_judge(_cfg(tmp_path, template="quality", fallback="error"), backend=backend)
    with pytest.raises(AlignkitError, match="cannot read a score.*'no idea'"):
        strict.judge([PROMPT], ["b"])
    with pytest.raises(ConfigError, match="fallback"):
        build_judge(_cfg(tmp_path, template="quality", fallback="zero"), backend=backend)


def test_cache_makes_a_rerun_free_and_keys_on_template_and_inputs(tmp_path):
    backend = ScriptedBackend(lambda q: "Score: 4" if "kind" in q else "Score: 2")
    cfg = _cfg(tmp_path, template="quality")
    responses = ["a kind reply", "a rude reply", "a kind reply"]  # a repeat is asked once
    first = build_judge(cfg, backend=backend).score([PROMPT] * 3, responses)
    assert backend.calls == 2
    rerun = build_judge(cfg, backend=backend)  # a new judge object, as in a new process
    assert rerun.score([PROMPT] * 3, responses).tolist() == first.tolist() == [4.0, 2.0, 4.0]
    assert backend.calls == 2 and rerun.stats.calls == 0 and rerun.stats.cached == 3
    # a new input, a different template or different sampling are new questions
    rerun.score([PROMPT], ["another reply"])
    assert backend.calls == 3
    build_judge(_cfg(tmp_path, template="toxicity"), backend=backend).score([PROMPT], ["a kind reply"])
    assert backend.calls == 4
    hot = _cfg(tmp_path, template="quality", generation=GenerationConfig(temperature=0.5))
    build_judge(hot, backend=backend).score([PROMPT], ["a kind reply"])
    assert backend.calls == 5
    # another judge model never reuses these verdicts
    other = ScriptedBackend(lambda q: "Score: 1", id="other-model")
    assert build_judge(cfg, backend=other).score([PROMPT], ["a kind reply"]).tolist() == [1.0]


# --------------------------------------------------------------------------- pairwise swap logic


def _first_listed(question: str) -> str:
    """Which of the two responses appears first in the question ("polite" or "rude")."""
    a = question.index("Response (A):")
    return "polite" if question.find("polite", a) < question.find("rude", a) else "rude"


def test_swap_a_content_judge_agrees_across_orders(tmp_path):
    # Picks whichever option holds the polite text, wherever it is placed.
    backend = ScriptedBackend(lambda q: "(A)" if _first_listed(q) == "polite" else "The answer is (B)")
    judge = build_judge(_cfg(tmp_path, template="pairwise"), backend=backend)
    v = judge.compare([PROMPT] * 2, ["polite text", "rude text"], ["rude text", "polite text"])
    assert [x.winner for x in v] == ["A", "B"] and all(x.consistent for x in v)
    assert [x.p_a for x in v] == [1.0, 0.0]
    # two orders per pair; the second pair is the first one swapped, so its questions are asked once
    assert backend.calls == 2


def test_swap_a_position_biased_judge_gives_ties(tmp_path):
    backend = ScriptedBackend(lambda q: "(A)")  # always the first position
    judge = build_judge(_cfg(tmp_path, template="pairwise"), backend=backend)
    v = judge.compare([PROMPT] * 2, ["polite text", "rude text"], ["rude text", "polite text"])
    assert [x.winner for x in v] == ["tie", "tie"] and [x.p_a for x in v] == [0.5, 0.5]
    assert judge.stats.inconsistent == 2 and judge.stats.unparsable == 0


def test_swap_unparsable_answer_is_a_counted_tie(tmp_path):
    backend = ScriptedBackend(lambda q: "(A)" if _first_listed(q) == "polite" else "I am not sure.")
    judge = build_judge(_cfg(tmp_path, template="pairwise"), backend=backend)
    (v,) = judge.compare([PROMPT], ["polite text"], ["rude text"])
    assert (v.winner, v.parsed, judge.stats.unparsable) == ("tie", False, 1)


def test_logprob_mode_averages_both_orders(tmp_path):
    # A judge with a pure position bias (P(first) = 0.9) and no opinion: the average cancels it.
    biased = ScriptedBackend(lambda q: [math.log(0.9), math.log(0.1)])
    judge = build_judge(_cfg(tmp_path, template="pairwise", mode="logprob"), backend=biased)
    (v,) = judge.compare([PROMPT], ["polite text"], ["rude text"])
    assert v.p_a == pytest.approx(0.5) and not v.consistent
    # The same bias plus a 3:1 taste for the polite text, wherever it stands:
    # polite first: 0.9*3 vs 0.1 -> 2.7/2.8; polite second: 0.1*3 vs 0.9 -> 0.3/1.2; the mean is p.
    def lp(q):
        w = (0.9 * 3, 0.1) if _first_listed(q) == "polite" else (0.9, 0.1 * 3)
        return [math.log(w[0] / 4), math.log(w[1] / 4)]
    judge = build_judge(_cfg(tmp_path, template="pairwise", mode="logprob"), backend=ScriptedBackend(lp, id="lp"))
    (v,) = judge.compare([PROMPT], ["polite text"], ["rude text"])
    assert v.p_a == pytest.approx((2.7 / 2.8 + 0.3 / 1.2) / 2) and v.winner == "A"
    with pytest.raises(ConfigError, match="logprob"):
        build_judge(_cfg(tmp_path, template="quality", mode="logprob"), backend=biased)


@pytest.fixture(scope="module")
def tiny_backend():
    return LocalBackend(ModelConfig(name="tiny:llama"), batch_size=4)


def test_logprob_mode_on_a_tiny_model(tmp_path, tiny_backend):
    judge = build_judge(_cfg(tmp_path, template="constitution", mode="logprob"), backend=tiny_backend)
    assert isinstance(judge, PairwiseJudge)
    a = ["Please be kind to him.", "You could talk to her.", "No."]
    b = ["He is an idiot.", "Tell her she is awful and stupid.", "Sure, here you go, a long answer."]
    ab = judge.compare([PROMPT] * 3, a, b)
    ba = judge.compare([PROMPT] * 3, b, a)
    for x, y in zip(ab, ba):
        assert 0.0 < x.mass[0] <= 1.0 and 0.0 < x.mass[1] <= 1.0  # disjoint options: P(A) + P(B) <= 1
        assert x.p_a == pytest.approx(1.0 - y.p_a, abs=1e-9)  # swap symmetry
        assert 0.0 < x.p_a < 1.0
    # batching and padding do not change a log-probability
    conv = judge.template.render(prompt="Hi", response_a=a[0], response_b=b[0])
    alone = tiny_backend.option_logprobs([conv], ("(A)", "(B)"))[0]
    batched = tiny_backend.option_logprobs([judge.template.render(prompt="Hi", response_a=a[1], response_b=b[1]),
                                            conv], ("(A)", "(B)"))[1]
    assert alone == pytest.approx(batched, abs=1e-4)


def test_judge_reward_spec(tmp_path):
    from alignkit.rewards import build_reward

    spec = {"judge": {"template": "toxicity", "model": {"name": "tiny:llama"}, "cache_dir": str(tmp_path / "jc"),
                      "generation": {"max_new_tokens": 6, "do_sample": False}}}
    reward = build_reward(spec)
    scores = reward([PROMPT] * 2, ["You are kind.", "You are awful."])
    assert scores.shape == (2,) and np.all((scores >= -5) & (scores <= 5))
    # each score is either parsed from the answer or the fallback (0, the midpoint of -5..5), and counted
    assert reward.stats.asked == 2
    assert reward.metrics()["judge_unparsable"] * 2 == reward.stats.unparsable
    assert (tmp_path / "jc" / "verdicts.sqlite").exists()
    with pytest.raises(ConfigError, match="pairwise"):
        build_reward("judge:pairwise@tiny:llama")
