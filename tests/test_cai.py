"""alignkit cai: the constitution, critique -> revision chains, the SFT hand-off and the AI preference set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.config import load_config
from alignkit.data.formats import load_preferences, load_sft
from alignkit.errors import AlignkitError
from alignkit.recipes import cai
from alignkit.recipes.cai import clean_revision, load_constitution

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_default_constitution_has_complete_principles():
    name, principles = load_constitution("default")
    assert name == "alignkit-default" and len(principles) >= 6
    assert len({p.name for p in principles}) == len(principles)
    for p in principles:
        assert p.critique and p.revision and "?" in p.preference


def test_bad_constitution_names_file_principle_and_field(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("principles:\n  - name: a\n    critique: Find the rude parts.\n    revision: Rewrite it.\n"
                 "  - name: b\n    critique: Find the rude parts.\n")
    with pytest.raises(AlignkitError, match=r"mine\.yaml: principles\[1\]: field 'revision'"):
        load_constitution(str(f))
    f.write_text("principles:\n  - critique: c\n    revision: r\n    wisdom: w\n")
    with pytest.raises(AlignkitError, match=r"principles\[0\]: unknown field\(s\) wisdom"):
        load_constitution(str(f))
    # a principle without a preference question gets one made from its name
    f.write_text("name: mine\nprinciples:\n  - name: kind\n    critique: c\n    revision: r\n")
    assert "'kind'" in load_constitution(str(f))[1][0].preference
    with pytest.raises(AlignkitError, match="not a shipped constitution"):
        load_constitution("no_such_constitution")


def test_repetition_flags_loops_not_short_or_fresh_text():
    assert cai.repetition("Please talk to him calmly about the queue.") == 0.0
    assert cai.repetition("Ladle, lazy, lazy, lazy, lazy, lazy, lazy, lazy, lazy, lazy") > 0.5
    assert cai.repetition("no no") == 0.0  # too short to have a 3-gram


def test_clean_revision_strips_labels_and_quotes():
    assert clean_revision('Revised answer: "Please be kind."') == "Please be kind."
    assert clean_revision("**Here is the revised response:** Talk to him calmly.") == "Talk to him calmly."
    assert clean_revision("Answering honestly: no.") == "Answering honestly: no."  # not a label
    assert clean_revision("  ") == ""


def test_cai_both_phases_on_a_tiny_model(tmp_path):
    cfg = load_config(cai.Config, CONFIGS / "cai-tiny.yaml",
                      [f"run.output_dir={tmp_path}", f"feedback.judge.cache_dir={tmp_path / 'judge-cache'}"])
    final = cai.main(cfg)
    _, principles = load_constitution("default")
    by_name = {p.name: p for p in principles}

    # 1. the SFT set: (prompt, final revision) with the whole chain, readable by alignkit sft
    rows, dropped = _rows(final / "sft.jsonl"), _rows(final / "sft_dropped.jsonl")
    examples = load_sft(str(final / "sft.jsonl"))
    assert len(examples) == len(rows) and len(rows) + len(dropped) == 3 and rows
    assert all(d["dropped"] for d in dropped)  # set aside with a reason, never silently
    for row, ex in zip(rows, examples):
        assert ex.prompt == row["prompt"] and ex.prompt[0]["role"] == "user"
        chain = row["chain"]
        assert [s["round"] for s in chain] == [1, 2]  # supervised.rounds: 2
        for step in chain:
            p = by_name[step["principle"]]
            assert (step["critique_request"], step["revision_request"]) == (p.critique, p.revision)
        # the target is the last non-empty revision (or the first answer when all were empty)
        last = next((s["revision"] for s in reversed(chain) if s["revision"]), row["initial_response"])
        assert ex.completion == last
        assert row["provenance"]["model"] == "tiny:llama" and row["provenance"]["rounds"] == 2
    assert "Critique request" in (final / "chains.md").read_text()

    # 2. the fine-tune ran through alignkit sft's loop and its model is the feedback policy
    sft_final = tmp_path / "tiny" / "cai" / "sft" / "final"
    assert (sft_final / "model.safetensors").exists() and (sft_final / "alignkit.json").exists()
    summary = json.loads((final / "summary.json").read_text())
    assert summary["sft_model"] == str(sft_final)

    # 3. the AI preference set: loadable pairs whose chosen side has the judge's soft label >= 0.5
    prefs = _rows(final / "preferences.jsonl")
    assert len(load_preferences(str(final / "preferences.jsonl"))) == len(prefs) == summary["preference_pairs"]
    assert summary["preference_pairs"] + summary["preference_ties"] + summary["preference_skipped"] == 3
    for row in prefs:
        assert 0.5 < row["soft_label"] < 1.0
        assert row["principle"] in by_name and row["provenance"]["question"] == by_name[row["principle"]].preference
        assert row["provenance"]["policy"] == str(sft_final) and row["provenance"]["mode"] == "logprob"
        assert all(0 < m <= 1 for m in row["provenance"]["option_mass"])
    assert summary["judge"]["calls"] == 2 * summary["judge"]["asked"]  # both orders asked

    # 4. --resume on a finished run does nothing
    assert cai.main(cfg, resume=True) == final


def test_cai_without_fine_tune_only_writes_the_data_sets(tmp_path):
    cfg = load_config(cai.Config, CONFIGS / "cai-tiny.yaml",
                      [f"run.output_dir={tmp_path}", "supervised.fine_tune=false", "supervised.rounds=1",
                       "feedback.enabled=false", "data.limit=2"])
    final = cai.main(cfg)
    assert len(load_sft(str(final / "sft.jsonl"))) == 2
    assert not (tmp_path / "tiny" / "cai" / "sft").exists() and not (final / "preferences.jsonl").exists()


def test_shipped_cai_configs_load():
    for name in ("cai.yaml", "cai-tiny.yaml"):
        cfg = load_config(cai.Config, CONFIGS / name)
        assert cfg.feedback.judge.template == "constitution" and cfg.feedback.judge.mode == "logprob"
    assert load_config(cai.Config, CONFIGS / "cai.yaml").data.limit == 20
