"""Every data format reads into the right records, and every bad record is reported
with its file, line/row and field (or skipped and counted with on_error=skip)."""

import json
import warnings
from pathlib import Path

import pytest

from alignkit.data.collate import collate, encode_example, render_prompt
from alignkit.data.formats import (
    load_kto, load_preferences, load_prompts, load_rankings, load_sft, ranking_to_pairs)
from alignkit.data.io import DataWarning
from alignkit.errors import AlignkitError, DataError

DATA = Path(__file__).parent / "data"


def test_sft_prompt_completion_and_messages():
    ex = load_sft(str(DATA / "sft.jsonl"))
    assert len(ex) == 3
    assert ex[0].prompt == [{"role": "user", "content": "How do I boil an egg?"}]
    assert ex[0].completion.startswith("Put the egg")
    assert ex[0].loc.endswith("sft.jsonl:line 1")
    msgs = load_sft(str(DATA / "sft_messages.jsonl"))
    # the last assistant turn is the response; everything before it is the prompt
    assert [m["role"] for m in msgs[1].prompt] == ["user", "assistant", "user"]
    assert msgs[1].completion == "Honey never spoils."
    assert msgs[0].prompt[0] == {"role": "system", "content": "You are brief."}


def test_preferences_text_messages_margin():
    pairs = load_preferences(str(DATA / "preferences.jsonl"))
    assert pairs[0].margin == 1.5 and pairs[1].margin is None
    assert pairs[1].chosen.startswith("Try 'The Hobbit'")
    assert pairs[1].prompt == [{"role": "user", "content": "Recommend a book."}]


def test_implicit_prompt_is_the_shared_prefix():
    (pair,) = load_preferences(str(DATA / "preferences_implicit.jsonl"))
    assert pair.prompt == [{"role": "user", "content": "Is it going to rain?"}]
    assert pair.rejected == "Who cares."


def test_hh_transcripts_split_into_prompt_and_last_turns():
    pairs = load_preferences(str(DATA / "hh.jsonl"))
    assert len(pairs) == 2
    p = pairs[0]
    assert [m["role"] for m in p.prompt] == ["user", "assistant", "user"]
    assert p.prompt[2]["content"] == "Something without vegetables."
    assert p.chosen == "A simple omelette with cheese is quick and tasty."
    assert p.rejected == "Starve, then."


def test_csv_json_and_parquet(tmp_path):
    csv_pairs = load_preferences(str(DATA / "preferences.csv"))
    assert len(csv_pairs) == 2 and csv_pairs[0].margin is None and csv_pairs[1].margin == 0.5
    assert load_preferences(str(DATA / "prefs.json"))[0].chosen == "Hello there!"
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (DATA / "kto.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "kto.parquet")
    kto = load_kto(str(tmp_path / "kto.parquet"))
    assert [k.label for k in kto] == [True, False]
    assert kto[1].loc.endswith("kto.parquet:row 1")


def test_hub_dataset_name_reads_through_datasets(tmp_path):
    # datasets.load_dataset with a local folder name follows the same code path as a hub id
    folder = tmp_path / "my_prefs"
    folder.mkdir()
    (folder / "train.jsonl").write_text((DATA / "preferences.jsonl").read_text())
    pairs = load_preferences(str(folder), split="train")
    assert len(pairs) == 2 and pairs[0].loc.startswith(str(folder))


def test_ranking_expands_to_chosen_first_pairs_per_labeler():
    items = load_rankings(str(DATA / "rankings.jsonl"))
    assert items[1].rankings[0].ranks == (2, 3, 1)  # order [2, 0, 1] -> dense ranks
    pairs = ranking_to_pairs(items[0], "per_labeler")
    # ann [2,3,4,1]: all C(4,2)=6 pairs; bob [1,2,3,1]: 6 minus the tie (0,3) = 5; cy flagged: 0
    assert len(pairs) == 11
    by = {(p.chosen, p.rejected): p.margin for p in pairs[:6]}
    assert by[("Salty, deep and full of life.", "The sea is stupid.")] == 3.0  # rank 1 vs 4
    assert all(p.margin > 0 for p in pairs)
    total = load_preferences(str(DATA / "rankings.jsonl"))
    assert len(total) == 11 + 3
    assert {p.group for p in total} == {0, 1}


def test_ranking_mean_rank_rule():
    items = load_rankings(str(DATA / "rankings.jsonl"))
    pairs = ranking_to_pairs(items[0], "mean_rank")
    # mean ranks over ann and bob: [1.5, 2.5, 3.5, 1.0] -> 6 pairs, margin |1.5 - 1.0| = 0.5
    assert len(pairs) == 6
    m = {(p.chosen, p.rejected): p.margin for p in pairs}
    assert m[("Salty, deep and full of life.", "The sea is vast and blue.")] == 0.5
    # an item flagged by half or more of its labelers is dropped
    from dataclasses import replace

    from alignkit.data.formats import LabelerRanking

    flagged = replace(items[0], rankings=items[0].rankings[:1] + (LabelerRanking("x", None, True),))
    assert ranking_to_pairs(flagged, "mean_rank") == []


def test_prompts_file_and_builtin():
    ps = load_prompts(str(DATA / "prompts.jsonl"))
    assert [p.id for p in ps] == ["p1", "p2", "p3"]
    assert load_prompts(str(DATA / "prompts.jsonl"), kind="red_team")[0].id == "p2"
    test = load_prompts("builtin:prompts", split="test")
    train = load_prompts("builtin:prompts", split="train")
    assert len(test) + len(train) >= 300
    assert not {p.id for p in test} & {p.id for p in train}
    assert {p.kind for p in test} == {"helpful", "red_team"}


BAD = [
    # (file name, content, expected fragments of the message)
    ("a.jsonl", '{"prompt": "hi", "completion": "ok"}\n{"prompt": "x", completion: 1}\n', ["a.jsonl:line 2", "invalid JSON"]),
    ("b.jsonl", '{"prompt": "hi"}\n', ["b.jsonl:line 1", "field 'completion'", "missing field"]),
    ("c.jsonl", '{"prompt": "hi", "completion": 5}\n', ["c.jsonl:line 1", "field 'completion'", "must be text"]),
    ("d.jsonl", '{"prompt": "  ", "completion": "ok"}\n', ["d.jsonl:line 1", "field 'prompt'", "empty text"]),
]


@pytest.mark.parametrize("name,content,expect", BAD)
def test_bad_sft_records_name_file_line_field(tmp_path, name, content, expect):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(DataError) as e:
        load_sft(str(f))
    for frag in expect:
        assert frag in str(e.value)


BAD_PREFS = [
    ('{"prompt": "p", "chosen": "same", "rejected": "same"}', "field 'rejected'", "identical"),
    ('{"prompt": "p", "chosen": "a"}', "field 'rejected'", "missing field"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}', "field 'margin'", "must be a number"),
    ('{"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}', "field 'prompt[0].role'", "must be one of"),
    ('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: OTHER\\n\\nAssistant: c"}',
     "field 'rejected'", "share everything but the last"),
    ('{"prompt": "p", "completions": ["a", "b", "c"], "rankings": [{"labeler": "x", "ranks": [1, 2]}]}',
     "field 'rankings[0].ranks'", "missing rank"),
    ('{"prompt": "p", "completions": ["a", "b", "c"], "rankings": [{"labeler": "x", "order": [0, 0, 1]}]}',
     "field 'rankings[0].order'", "duplicate rank"),
    ('{"prompt": "p", "completions": ["a", "b", "c"], "rankings": [{"labeler": "x", "ranks": [1, 3, 3]}]}',
     "field 'rankings[0].ranks'", "skip a number"),
]


@pytest.mark.parametrize("line,field,problem", BAD_PREFS)
def test_bad_preference_records(tmp_path, line, field, problem):
    f = tmp_path / "prefs.jsonl"
    f.write_text('{"prompt": "ok", "chosen": "good", "rejected": "bad"}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        load_preferences(str(f))
    msg = str(e.value)
    assert "prefs.jsonl:line 2" in msg and field in msg and problem in msg


def test_csv_errors_name_the_row(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('prompt,chosen,rejected\nok,good,bad\nok,,bad\n')
    with pytest.raises(DataError, match=r"p.csv:row 3: field 'chosen': empty text"):
        load_preferences(str(f))


def test_on_error_skip_counts_and_warns(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\nnot json\n{"prompt": "c"}\n{"prompt": "d", "completion": "e"}\n')
    with pytest.warns(DataWarning, match=r"skipped 2 of 4 SFT records.*mixed.jsonl:line 2"):
        ex = load_sft(str(f), on_error="skip")
    assert [e.completion for e in ex] == ["b", "e"]


def test_empty_result_is_an_error(tmp_path):
    f = tmp_path / "none.jsonl"
    f.write_text("garbage\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AlignkitError, match="no usable"):
            load_sft(str(f), on_error="skip")


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(AlignkitError, match="no such file"):
        load_sft(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(AlignkitError, match="unknown file type"):
        load_sft(str(tmp_path / "x.txt"))


def test_over_length_is_a_located_error(tiny_tokenizer):
    (ex,) = load_sft(str(DATA / "sft.jsonl"), limit=1)
    with pytest.raises(DataError) as e:
        encode_example(tiny_tokenizer, ex.prompt, ex.completion, max_length=8, loc=ex.loc)
    assert "sft.jsonl:line 1" in str(e.value) and "field 'completion'" in str(e.value)
    assert "data.max_length=8" in str(e.value)


def test_encoding_masks_prompt_and_ends_with_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = load_sft(str(DATA / "sft.jsonl"))
    enc = [encode_example(tok, e.prompt, e.completion, 256) for e in ex]
    batch = collate(enc, tok.pad_token_id)
    for row, e in enumerate(enc):
        n = len(e.input_ids)
        assert batch.input_ids[row, n - 1] == tok.eos_token_id  # response ends with EOS
        assert batch.response_mask[row, :e.prompt_len].sum() == 0
        assert batch.response_mask[row, e.prompt_len:n].all()
        assert not batch.attention_mask[row, n:].any()  # right padding
    prompt_text = render_prompt(tok, ex[0].prompt)
    assert prompt_text.endswith("<|im_start|>assistant\n")
    decoded = tok.decode(enc[0].input_ids[enc[0].prompt_len:], skip_special_tokens=True)
    assert decoded == ex[0].completion
