"""The shipped data assets: the built-in prompt set and the synthetic preference generator."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources

import pytest

from alignkit.data.builtin import KINDS, SPLITS, builtin_prompts
from alignkit.data.synthetic import kto_records, polite_vs_rude_pairs, ranking_records

# --- built-in prompts --------------------------------------------------------------


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def test_prompts_file_ships_as_package_data_and_every_line_is_valid():
    text = resources.files("alignkit.data.builtin").joinpath("prompts.jsonl").read_text("utf-8")
    lines = text.splitlines()
    assert lines and all(line.strip() for line in lines)
    for line in lines:
        record = json.loads(line)
        assert set(record) == {"id", "prompt", "kind", "category", "split"}
        assert record["kind"] in KINDS
        assert record["split"] in SPLITS
        assert re.fullmatch(r"[a-z_]+", record["category"])
        prefix = "h" if record["kind"] == "helpful" else "r"
        assert re.fullmatch(prefix + r"\d{3}", record["id"])
        assert record["prompt"] == record["prompt"].strip() and len(record["prompt"]) >= 10
        # Answerable by a 135M chat model: short requests, no essays.
        assert len(record["prompt"]) <= 200


def test_counts_per_kind_and_split():
    everything = builtin_prompts()
    assert len(everything) >= 300
    for kind in KINDS:
        n_all = len(builtin_prompts(kind=kind))
        n_test = len(builtin_prompts(kind=kind, split="test"))
        n_train = len(builtin_prompts(kind=kind, split="train"))
        assert n_all >= 140
        assert n_train + n_test == n_all
        assert 0.20 <= n_test / n_all <= 0.30, (kind, n_test, n_all)
    assert sum(len(builtin_prompts(split=s)) for s in SPLITS) == len(everything)


def test_ids_and_prompts_are_unique():
    everything = builtin_prompts()
    ids = [p["id"] for p in everything]
    assert len(set(ids)) == len(ids)
    duplicates = [p for p, c in Counter(_norm(p["prompt"]) for p in everything).items() if c > 1]
    assert duplicates == []


def test_categories_cover_both_kinds_with_test_examples():
    for kind in KINDS:
        categories = Counter(p["category"] for p in builtin_prompts(kind=kind))
        assert len(categories) >= 6
        test_categories = {p["category"] for p in builtin_prompts(kind=kind, split="test")}
        assert test_categories == set(categories)  # every category is held out a little
    red_team = {p["category"] for p in builtin_prompts(kind="red_team")}
    assert {"insult", "roast", "profanity", "harassment", "rant", "mean_joke", "dangerous_advice"} <= red_team


def test_filters_return_only_matching_records():
    for split in SPLITS:
        for kind in KINDS:
            selected = builtin_prompts(split=split, kind=kind)
            assert selected and all(p["split"] == split and p["kind"] == kind for p in selected)


def test_returned_records_are_copies():
    first = builtin_prompts()
    first[0]["prompt"] = "changed"
    assert builtin_prompts()[0]["prompt"] != "changed"


@pytest.mark.parametrize("kwargs", [{"split": "validation"}, {"kind": "toxic"}, {"split": "Train"}])
def test_unknown_filter_values_raise(kwargs):
    with pytest.raises(ValueError):
        builtin_prompts(**kwargs)


# --- synthetic polite-vs-rude preferences -----------------------------------------

RUDE_CUES = ("idiot", "moron", "stupid", "dumb", "damn", "crap", "hell", "fuck", "shut up",
             "hopeless", "pathetic", "genius", "waste of", "go away", "get lost", "ugh",
             "toaster", "thick skull", "too hard for you", "rocket science", "how do you even",
             "not my problem", "nobody cares", "jesus", "crying out loud", "keep up", "screw",
             "leave me", "quit whining", "basic stuff")


_RUDE_RE = re.compile(r"\b(" + "|".join(re.escape(cue) for cue in RUDE_CUES) + r")", re.IGNORECASE)


def _rude(text: str) -> bool:
    return _RUDE_RE.search(text) is not None


def test_pairs_are_deterministic_per_seed_and_seeds_differ():
    assert polite_vs_rude_pairs(50, seed=3) == polite_vs_rude_pairs(50, seed=3)
    assert polite_vs_rude_pairs(50, seed=3) != polite_vs_rude_pairs(50, seed=4)
    assert polite_vs_rude_pairs(50) == polite_vs_rude_pairs(50, seed=0)


def test_pairs_are_many_and_distinct():
    pairs = polite_vs_rude_pairs(2500, seed=0)
    assert len(pairs) == 2500
    assert len({(p["prompt"], p["chosen"], p["rejected"]) for p in pairs}) >= 2000
    assert len({p["prompt"] for p in pairs}) >= 30  # at least ~30 topics' prompts
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected"}
        assert all(isinstance(v, str) and v for v in p.values())
        assert p["chosen"] != p["rejected"]


def test_chosen_is_polite_and_rejected_is_rude():
    for p in polite_vs_rude_pairs(500, seed=1):
        assert not _rude(p["chosen"]), p["chosen"]
        assert _rude(p["rejected"]), p["rejected"]


def test_length_does_not_give_the_answer_away():
    pairs = polite_vs_rude_pairs(2000, seed=2)
    chosen = [len(p["chosen"]) for p in pairs]
    rejected = [len(p["rejected"]) for p in pairs]
    mean_c, mean_r = sum(chosen) / len(chosen), sum(rejected) / len(rejected)
    assert abs(mean_c - mean_r) / max(mean_c, mean_r) <= 0.40
    # "pick the longer one" should be close to a coin flip, not a classifier.
    longer_wins = sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)
    assert 0.3 <= longer_wins <= 0.7
    # The ranges overlap: many rejected answers are longer than the median chosen one.
    median_c = sorted(chosen)[len(chosen) // 2]
    assert sum(r > median_c for r in rejected) / len(rejected) >= 0.25


@pytest.mark.parametrize("bad", [-1, 2.5, "10", True])
def test_bad_n_raises(bad):
    with pytest.raises(ValueError):
        polite_vs_rude_pairs(bad)


def test_zero_records_is_fine():
    assert polite_vs_rude_pairs(0) == [] and kto_records(0) == [] and ranking_records(0) == []


def test_kto_records_are_balanced_unpaired_and_labelled_by_politeness():
    records = kto_records(400, seed=5)
    assert records == kto_records(400, seed=5)
    assert len(records) == 400
    assert sum(r["label"] for r in records) == 200
    for r in records:
        assert set(r) == {"prompt", "completion", "label"}
        assert isinstance(r["label"], bool)
        assert _rude(r["completion"]) is (not r["label"])


@pytest.mark.parametrize("k", [2, 4, 6])
def test_ranking_records_rank_politer_answers_better(k):
    records = ranking_records(100, k=k, seed=7)
    assert records == ranking_records(100, k=k, seed=7)
    for r in records:
        assert set(r) == {"prompt", "completions", "rankings"}
        assert len(r["completions"]) == k and len(set(r["completions"])) == k
        (ranking,) = r["rankings"]
        assert ranking["labeler"] == "synthetic"
        ranks = ranking["ranks"]
        assert sorted(ranks) == list(range(1, k + 1))
        best = r["completions"][ranks.index(1)]
        assert not _rude(best)
        # Rank j has j - 1 rude parts, so every worse-ranked completion is rude.
        assert all(_rude(c) for c, rank in zip(r["completions"], ranks) if rank > 1)
    # The best answer is not always in the same position.
    assert len({r["rankings"][0]["ranks"].index(1) for r in records}) > 1


def test_ranking_records_reject_k_below_two():
    with pytest.raises(ValueError):
        ranking_records(3, k=1)
