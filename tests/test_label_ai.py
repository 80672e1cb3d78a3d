"""alignkit label-ai: K samples per prompt ranked by a reward -> rankings.jsonl + pairs.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.cli import main as cli_main
from alignkit.config import load_config
from alignkit.data.formats import load_preferences, load_rankings
from alignkit.recipes import label_ai
from alignkit.recipes.label_ai import dense_ranks, ranking_pairs
from alignkit.rewards import build_reward

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dense_ranks_ties_and_tolerance():
    assert dense_ranks([0.2, 0.9, 0.5, 0.9]) == [3, 1, 2, 1]
    # within 0.05 of the group's best ties; 0.9 is 0.1 below 1.0: a new rank (no chaining)
    assert dense_ranks([1.0, 0.97, 0.9, 0.93], tie_tolerance=0.05) == [1, 1, 2, 2]
    pairs, short = ranking_pairs([1.0, 0.0, 0.5], [1, 3, 2], min_gap=0.6)
    assert pairs == [(0, 1)] and short == 2


def test_label_ai_tiny_model_end_to_end(tmp_path):
    cfg = load_config(label_ai.Config, CONFIGS / "label-ai-tiny.yaml", [f"run.output_dir={tmp_path}"])
    final = label_ai.main(cfg)
    rankings, pairs = _rows(final / "rankings.jsonl"), _rows(final / "pairs.jsonl")
    summary = json.loads((final / "summary.json").read_text())
    assert summary["prompts"] == 6 and summary["ranked"] == len(rankings)

    # the files load with the foundation's loaders (what rm and dpo read)
    items = load_rankings(str(final / "rankings.jsonl"))
    loaded_pairs = load_preferences(str(final / "pairs.jsonl"))
    assert len(items) == len(rankings) and len(loaded_pairs) == len(pairs) == summary["pairs"]

    reward = build_reward(cfg.reward)
    expected_pairs = 0
    for row in rankings:
        scores, ranks = row["scores"], row["rankings"][0]["ranks"]
        assert row["rankings"][0]["labeler"] == "rule:length:10"
        # the scores are the reward's, and rank 1 holds the highest score
        assert scores == pytest.approx(reward([row["prompt"]] * len(scores), row["completions"]).tolist())
        assert ranks == dense_ranks(scores)
        assert scores[ranks.index(1)] == max(scores)
        prov = row["provenance"]
        assert prov["model"] == "tiny:llama" and prov["reward"] == "rule:length:10"
        assert prov["seed"] == 0 and prov["k"] == 3 and prov["prompt_id"].startswith("r")
        expected_pairs += sum(ranks[i] != ranks[j] for i in range(len(ranks)) for j in range(i + 1, len(ranks)))
    assert expected_pairs == len(pairs)
    for p in pairs:
        c, r = p["provenance"]["scores"]
        assert c > r and p["margin"] == pytest.approx(c - r)  # chosen scored higher; margin = score gap


def test_label_ai_ranks_given_completions_and_counts_what_it_drops(tmp_path):
    data = tmp_path / "completions.jsonl"
    rows = [
        {"id": "p1", "prompt": "Say yes?", "model": "someone",
         "completions": ["yes yes", "no", "yes no", "  ", "no"]},  # one empty, one repeat
        {"id": "p2", "prompt": "Again?", "completions": ["no", "no "]},  # one distinct text only: skipped
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = cli_main(["label-ai", "--config", str(CONFIGS / "label-ai-tiny.yaml"), f"data.path={data}",
                     "reward=rule:token_share:yes", "min_gap=0.6", "margin=rank_gap", f"run.output_dir={tmp_path}"])
    assert code == 0
    final = tmp_path / "tiny" / "label-ai" / "final"
    (ranking,) = _rows(final / "rankings.jsonl")
    assert ranking["completions"] == ["yes yes", "no", "yes no"]
    assert ranking["scores"] == pytest.approx([1.0, 0.0, 0.5]) and ranking["rankings"][0]["ranks"] == [1, 3, 2]
    assert ranking["provenance"]["model"] == "someone"
    (pair,) = _rows(final / "pairs.jsonl")  # the 0.5 gaps fall under min_gap
    assert (pair["chosen"], pair["rejected"], pair["margin"]) == ("yes yes", "no", 2.0)
    summary = json.loads((final / "summary.json").read_text())
    assert summary["dropped_empty"] == 1 and summary["dropped_duplicate"] == 2
    assert summary["prompts_skipped"] == 1 and summary["pairs_below_min_gap"] == 2


def test_label_ai_bad_input_is_a_located_error(tmp_path, capsys):
    data = tmp_path / "completions.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completions": ["x", "y"]}) + "\n"
                    + json.dumps({"prompt": "b", "completions": "just one"}) + "\n")
    code = cli_main(["label-ai", "--config", str(CONFIGS / "label-ai-tiny.yaml"), f"data.path={data}",
                     f"run.output_dir={tmp_path}"])
    assert code == 2
    assert f"{data}:line 2: field 'completions'" in capsys.readouterr().err
    code = cli_main(["label-ai", "--config", str(CONFIGS / "label-ai-tiny.yaml"), "reward=no_such_reward",
                     f"run.output_dir={tmp_path}"])
    assert code == 2 and "unknown reward 'no_such_reward'" in capsys.readouterr().err


def test_shipped_label_ai_configs_load():
    for name in ("label-ai.yaml", "label-ai-tiny.yaml"):
        cfg = load_config(label_ai.Config, CONFIGS / name)
        assert cfg.k >= 2 and cfg.reward
