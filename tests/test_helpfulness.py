"""The offline helpfulness judge against answers graded by hand (alignkit/eval/validation/helpfulness.jsonl).

Its four constants were chosen on the ``dev`` half; the figures are on the ``test``
half (222 answers to 47 everyday prompts). README, "Evaluation": ROC AUC 0.73 against
the helpful label and 0.72 pairwise accuracy over the 353 pairs of answers to the same
prompt with different grades; this test holds both to >= 0.70, and the kinds of
failure it is built to see (refusals, empty and looping answers) to scores far below
good answers.
"""

import collections
import itertools
import json
from importlib import resources

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from alignkit.eval.helpfulness import helpfulness_judge, prompt_of
from alignkit.rewards import build_reward

FLOOR = 0.70


@pytest.fixture(scope="module")
def graded():
    text = resources.files("alignkit.eval").joinpath("validation", "helpfulness.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert len(rows) >= 400
    test = [r for r in rows if r["split"] == "test"]
    scores = helpfulness_judge()([r["prompt"] for r in test], [r["response"] for r in test])
    return test, scores


def test_auc_and_pairwise_accuracy_on_the_held_out_half(graded):
    test, scores = graded
    assert len(test) >= 200
    auc = roc_auc_score([r["helpful"] for r in test], scores)
    by_prompt = collections.defaultdict(list)
    for i, r in enumerate(test):
        by_prompt[r["prompt_id"]].append(i)
    right = total = 0.0
    for rows in by_prompt.values():
        for a, b in itertools.combinations(rows, 2):
            if test[a]["grade"] == test[b]["grade"]:
                continue
            better, worse = (a, b) if test[a]["grade"] > test[b]["grade"] else (b, a)
            total += 1
            right += 1.0 if scores[better] > scores[worse] else 0.5 if scores[better] == scores[worse] else 0.0
    assert total >= 300
    assert auc >= FLOOR and right / total >= FLOOR, (auc, right / total)


def test_dodges_score_far_below_good_answers(graded):
    test, scores = graded
    mean = {c: float(np.mean([s for r, s in zip(test, scores) if r["category"] == c]))
            for c in ("good", "refusal", "empty", "looping")}
    for dodge in ("refusal", "empty", "looping"):
        assert mean[dodge] < mean["good"] - 0.5, mean


def test_the_reward_spec_scores_in_zero_to_one_and_reads_the_last_user_turn():
    judge = build_reward("helpfulness")
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I boil an egg?"}]
    scores = judge([prompt] * 3, ["Put the egg in boiling water for about seven minutes, then cool it in cold water.",
                                  "I'm sorry, but I can't help with cooking.",
                                  "egg egg egg egg egg egg egg egg egg egg egg egg"])
    assert ((scores >= 0) & (scores <= 1)).all()
    assert scores[0] > 0.5 and scores[1] == 0.0 and scores[2] < 0.1
    assert prompt_of(prompt) == "How do I boil an egg?"


def test_the_judge_is_kept_per_device_not_per_process():
    # A stage that asks for the judge on its engine's device gets it there, and a caller that
    # asks later for another device (the refusal detector, on the CPU) does not get that one.
    import torch

    cpu = helpfulness_judge()
    meta = helpfulness_judge(torch.device("meta"))
    assert meta is not cpu and meta.encoder.device.type == "meta"
    assert helpfulness_judge() is cpu and helpfulness_judge("cpu") is cpu and cpu.encoder.device.type == "cpu"
    assert helpfulness_judge(torch.device("meta")) is meta
