"""Bad data, class by class, at the shared reader: every member a located one-line error naming
file, line (row, item) and field, or with ``data.on_error=skip`` a counted skip; never a traceback.

Classes: JSON nested too deeply for the parser; CSV cells over the csv module's field limit;
text that is not encodable (a lone UTF-16 surrogate); a format detected from an unreadable first
line; a reward returning text or booleans instead of numbers."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest

from alignkit.data.io import DataWarning
from test_hardening import run  # alignkit ARGS -> (exit code, stderr), a failure one line

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = {"prompt": "Say hi", "completion": "Hello there, nice to meet you."}
PAIR = {"prompt": "Say hi", "chosen": "Hello there, nice to meet you.", "rejected": "Go away."}
RANKED = {"prompt": "Say hi", "completions": ["Hello there, nice to meet you.", "Go away.", "Hi!"]}
DEEP = "[" * 200_000 + "]" * 200_000  # beyond what the json parser can recurse into
SURROGATE = "\\ud800"  # as a JSON file writes it: a lone half of a UTF-16 pair


def jsonl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def line(template: str, value: str) -> bytes:
    """A JSONL line with raw JSON text ``value`` put where the template says VALUE."""
    return template.replace("VALUE", value).encode()


def stage(name: str, tmp_path, path, *overrides) -> list[str]:
    common = [f"run.output_dir={tmp_path / 'runs'}", f"data.path={path}"]
    extra = {"sft": ["train.max_steps=1", "data.eval_fraction=0"],
             "rm": ["train.max_steps=1", "data.eval_fraction=0"],
             "dpo": ["train.max_steps=1", "data.eval_fraction=0"],
             "label-ai": []}[name]
    return [name, "--config", str(CONFIGS / f"{name}-tiny.yaml"), *common, *extra, *overrides]


# --------------------------------------------------------------------------- 1. JSON nested too deeply


@pytest.mark.parametrize("name, rows, where", [
    ("sft", [GOOD, line('{"prompt": "Say hi", "completion": VALUE}', DEEP)], "line 2"),
    ("sft", [line('{"prompt": VALUE, "completion": "x"}', DEEP), GOOD], "line 1"),
    ("rm", [PAIR, PAIR, line('{"prompt": "Say hi", "chosen": "a", "rejected": VALUE}', DEEP)], "line 3"),
    ("dpo", [PAIR, line('{"prompt": "p", "chosen": VALUE, "rejected": "b"}', DEEP)], "line 2"),
    ("label-ai", [RANKED, line('{"prompt": "p", "completions": VALUE}', DEEP)], "line 2"),
])
def test_json_nested_too_deep_for_the_parser_is_a_located_error(tmp_path, capsys, name, rows, where):
    path = tmp_path / "deep.jsonl"
    path.write_bytes(jsonl(*rows))
    code, err = run(capsys, *stage(name, tmp_path, path))
    assert code == 2 and f"deep.jsonl:{where}: invalid JSON (lists/objects nested more than" in err


def test_nesting_within_the_parser_but_past_the_limit_names_the_field(tmp_path, capsys):
    path = tmp_path / "deep.jsonl"
    path.write_bytes(jsonl(GOOD, line('{"prompt": "Say hi", "completion": "x", "meta": VALUE}',
                                      "[" * 300 + "]" * 300)))
    code, err = run(capsys, *stage("sft", tmp_path, path))
    assert code == 2 and "deep.jsonl:line 2: field 'meta': lists/objects nested more than 100 levels deep" in err


def test_a_deeply_nested_json_file_names_the_line(tmp_path, capsys):
    path = tmp_path / "deep.json"
    path.write_text(f'[{json.dumps(GOOD)},\n {{"prompt": "Say hi", "completion": {DEEP}}}]')
    code, err = run(capsys, *stage("sft", tmp_path, path))
    assert code == 2 and "deep.json:line 2: invalid JSON (lists/objects nested more than 100 levels deep)" in err


def test_an_integer_too_long_for_python_is_a_located_error(tmp_path, capsys):
    path = tmp_path / "big.jsonl"
    path.write_bytes(jsonl(PAIR, line('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": VALUE}', "9" * 5000)))
    code, err = run(capsys, *stage("rm", tmp_path, path))
    assert code == 2 and "big.jsonl:line 2: invalid JSON (" in err


@pytest.mark.parametrize("name, rows, what", [
    ("sft", [GOOD, line('{"prompt": "Say hi", "completion": VALUE}', DEEP), GOOD], "skipped 1 of 3 SFT records"),
    ("dpo", [PAIR, line('{"prompt": "p", "chosen": VALUE, "rejected": "b"}', DEEP), PAIR, PAIR],
     "skipped 1 of 4 preference records"),
    ("label-ai", [RANKED, line('{"prompt": "p", "completions": VALUE}', DEEP), RANKED],
     "skipped 1 of 3 records with completions"),
])
def test_deep_nesting_is_skipped_and_counted_with_on_error_skip(tmp_path, capsys, name, rows, what):
    path = tmp_path / "deep.jsonl"
    path.write_bytes(jsonl(*rows))
    with pytest.warns(DataWarning, match=rf"{what}.*deep.jsonl:line 2: invalid JSON \(lists/objects nested"):
        code, _ = run(capsys, *stage(name, tmp_path, path, "data.on_error=skip"))
    assert code == 0


def test_a_csv_cell_too_deep_to_decode_stays_text():
    from alignkit.data.io import read_records

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "cells.csv"
        path.write_text(f'prompt,completion,meta\nSay hi,Hello,"{DEEP[:5000]}{DEEP[-5000:]}"\n')
        (rec,) = read_records(str(path))
    assert rec.data["meta"].startswith("[[[") and "__invalid__" not in rec.data


# --------------------------------------------------------------------------- 2. CSV cells over the field limit


def test_a_csv_cell_over_the_csv_modules_default_limit_is_read(tmp_path, capsys):
    long_note = "a long note " * 15_000  # 180,000 characters: over csv's default 131,072
    path = tmp_path / "long.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "completion", "notes"])
        w.writerow(["Say hi", "Hello there", long_note])
        w.writerow(["Say bye", "Goodbye now", "short"])
    code, err = run(capsys, *stage("sft", tmp_path, path))
    assert code == 0, err
    from alignkit.data.io import read_records

    assert [r.data["notes"] for r in read_records(str(path))] == [long_note, "short"]


def test_a_long_csv_preference_cell_is_read_by_rm(tmp_path, capsys):
    path = tmp_path / "prefs.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "chosen", "rejected", "source"])
        w.writerows([["Say hi", "Hello there", "Go away", "x" * 200_000], ["Say bye", "Goodbye", "Whatever", "y"]])
    code, err = run(capsys, *stage("rm", tmp_path, path))
    assert code == 0, err


@pytest.fixture
def small_csv_limit(monkeypatch):
    """A field limit of 50 characters: the csv module's 'field larger than field limit' on demand."""
    import alignkit.data.io as io_mod

    before = csv.field_size_limit()
    monkeypatch.setattr(io_mod, "CSV_FIELD_LIMIT", 50)
    csv.field_size_limit(50)
    yield
    csv.field_size_limit(before)


@pytest.mark.parametrize("name, header, rows", [
    ("sft", ["prompt", "completion"], [["Say hi", "Hello"], ["Say hi", "x" * 80], ["Say bye", "Bye now"]]),
    ("rm", ["prompt", "chosen", "rejected"], [["p", "good", "bad"], ["p", "y" * 80, "bad"], ["q", "fine", "poor"]]),
])
def test_a_csv_error_is_a_located_error_and_skippable(tmp_path, capsys, small_csv_limit, name, header, rows):
    path = tmp_path / "data.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    code, err = run(capsys, *stage(name, tmp_path, path))
    assert code == 2 and "data.csv:row 3: not valid CSV (field larger than field limit (50))" in err
    with pytest.warns(DataWarning, match=r"skipped 1 of 3 .*data.csv:row 3: not valid CSV"):
        code, _ = run(capsys, *stage(name, tmp_path, path, "data.on_error=skip"))
    assert code == 0


def test_a_csv_header_over_the_limit_is_a_located_error(tmp_path, capsys, small_csv_limit):
    path = tmp_path / "data.csv"
    path.write_text("prompt," + "c" * 80 + "\nSay hi,Hello\n")
    code, err = run(capsys, *stage("sft", tmp_path, path))
    assert code == 2 and "data.csv:row 1: not valid CSV" in err


# --------------------------------------------------------------------------- 3. text that is not text


@pytest.mark.parametrize("name, rows, expected", [
    ("sft", [GOOD, line('{"prompt": "Say hi", "completion": "caf\\u00e9 VALUE"}', SURROGATE)],
     "s.jsonl:line 2: field 'completion': not valid text (a lone surrogate \\ud800 at character 6"),
    ("sft", [GOOD, line('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                        '"content": "VALUE"}]}', "\\udfff")],
     "s.jsonl:line 2: field 'messages[1].content': not valid text (a lone surrogate \\udfff"),
    ("sft", [line('{"prompt": "Say hi", "completion": "ok", "VALUE": 1}', SURROGATE), GOOD],
     "s.jsonl:line 1: field '\\ud800': the key is not valid text"),
    ("rm", [PAIR, PAIR, line('{"prompt": "Say hi", "chosen": "a VALUE", "rejected": "b"}', "\\udc80")],
     "s.jsonl:line 3: field 'chosen': not valid text"),
    ("dpo", [PAIR, line('{"prompt": [{"role": "user", "content": "VALUE"}], "chosen": "a", "rejected": "b"}',
                        SURROGATE)],
     "s.jsonl:line 2: field 'prompt[0].content': not valid text"),
    ("label-ai", [RANKED, line('{"prompt": "p", "completions": ["one", "VALUE two"]}', SURROGATE)],
     "s.jsonl:line 2: field 'completions[1]': not valid text"),
    ("label-ai", [RANKED, line('{"prompt": "p", "completions": ["a", "b"], "meta": {"x": ["VALUE"]}}', SURROGATE)],
     "s.jsonl:line 2: field 'meta.x[0]': not valid text"),
])
def test_a_lone_surrogate_is_a_located_error_at_the_reader(tmp_path, capsys, name, rows, expected):
    path = tmp_path / "s.jsonl"
    path.write_bytes(jsonl(*rows))
    code, err = run(capsys, *stage(name, tmp_path, path))
    assert code == 2 and expected in err


def test_a_lone_surrogate_in_a_json_file_names_the_item(tmp_path, capsys):
    path = tmp_path / "s.json"
    path.write_text('[{"prompt": "Say hi", "completion": "Hello"},\n {"prompt": "\\ud800", "completion": "x"}]')
    code, err = run(capsys, *stage("sft", tmp_path, path))
    assert code == 2 and "s.json:item 1: field 'prompt': not valid text" in err


def test_a_lone_surrogate_in_a_csv_json_cell_names_the_row(tmp_path, capsys):
    path = tmp_path / "s.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "completion"])
        w.writerow(["Say hi", "Hello"])
        w.writerow(['[{"role": "user", "content": "\\ud800"}]', "Hello"])
    code, err = run(capsys, *stage("sft", tmp_path, path))
    assert code == 2 and "s.csv:row 3: field 'prompt[0].content': not valid text" in err


def test_parquet_text_that_is_not_utf8_names_the_row_and_column(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = [b"Hello there", b"caf\xe9", b"Bye now"]
    offsets = pa.array([0, 11, 15, 22], type=pa.int32()).buffers()[1]
    column = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(b"".join(text))])
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["Say hi", "Say hi", "Say bye"], "completion": column}), path)
    code, err = run(capsys, *stage("sft", tmp_path, path))
    assert code == 2 and "bad.parquet:row 1: field 'completion': not UTF-8 text (byte 0xe9" in err
    with pytest.warns(DataWarning, match=r"skipped 1 of 3 SFT records"):
        code, _ = run(capsys, *stage("sft", tmp_path, path, "data.on_error=skip"))
    assert code == 0


def test_every_record_source_is_checked_for_lone_surrogates(tmp_path):
    """JSONL, JSON, CSV and Parquet rows all pass the one check (Parquet cannot store a lone
    surrogate, so its record is checked as the reader produces it)."""
    from alignkit.data import io as io_mod

    rec = io_mod.checked(io_mod.Record("x.parquet", "row 4", {"prompt": "ok", "tags": ["a", "b\ud800"]}))
    assert str(rec.error(None, rec.data["__invalid__"])).startswith(
        "x.parquet:row 4: field 'tags[1]': not valid text (a lone surrogate \\ud800 at character 2")
    assert io_mod.checked(io_mod.Record("x", "row 0", {"prompt": "caf\u00e9 \U0001F600"})).data["prompt"]


@pytest.mark.parametrize("name, rows, what", [
    ("sft", [GOOD, line('{"prompt": "Say hi", "completion": "VALUE"}', SURROGATE), GOOD], "SFT records"),
    ("rm", [PAIR, line('{"prompt": "VALUE", "chosen": "a", "rejected": "b"}', SURROGATE), PAIR], "preference records"),
    ("label-ai", [RANKED, line('{"prompt": "p", "completions": ["VALUE", "b"]}', SURROGATE), RANKED],
     "records with completions"),
])
def test_a_lone_surrogate_is_skipped_and_counted_with_on_error_skip(tmp_path, capsys, name, rows, what):
    path = tmp_path / "s.jsonl"
    path.write_bytes(jsonl(*rows))
    with pytest.warns(DataWarning, match=rf"skipped 1 of 3 {what}.*s.jsonl:line 2: field '[^']+': not valid text"):
        code, _ = run(capsys, *stage(name, tmp_path, path, "data.on_error=skip"))
    assert code == 0


@pytest.mark.parametrize("value, template, message", [
    (DEEP, '{"prompt": "p", "completions": VALUE}', "line 2: invalid JSON (lists/objects nested"),
    (SURROGATE, '{"prompt": "p", "completions": ["a", "VALUE"]}', "line 2: field 'completions[1]': not valid text"),
])
def test_a_project_file_line_the_app_cannot_store_is_a_located_error(tmp_path, capsys, value, template, message):
    from alignkit.feedback.cli import main as label

    path = tmp_path / "items.jsonl"
    path.write_bytes(jsonl(RANKED, line(template, value)))
    assert label(["create-project", "--db", f"sqlite:///{tmp_path / 'db.sqlite'}", "--file", str(path),
                  "--kind", "ranking", "--name", "p"]) == 2
    err = capsys.readouterr().err
    assert f"items.jsonl:{message}" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- 4. format from the first record that parses


@pytest.mark.parametrize("first", [
    b'{"prompt": "caf\xe9", "completions": ["a", "b"]}',  # not UTF-8
    b'{"prompt": "p", "completions": ["a", "b"',  # not JSON
    line('{"prompt": "VALUE", "completions": ["a", "b"]}', SURROGATE),  # not text
    line('{"prompt": "p", "completions": VALUE}', DEEP),  # too deep
])
def test_label_ai_detects_a_completions_file_past_an_unreadable_first_line(tmp_path, capsys, first):
    path = tmp_path / "completions.jsonl"
    path.write_bytes(jsonl(first, {"prompt": "p1", "completions": ["a short one", "a much longer answer here"]},
                           {"prompt": "p2", "completions": ["one answer", "another answer, longer"]}))
    args = stage("label-ai", tmp_path, path)
    code, err = run(capsys, *args)
    assert code == 2 and "completions.jsonl:line 1:" in err
    with pytest.warns(DataWarning, match=r"skipped 1 of 3 records with completions"):
        code, _ = run(capsys, *args, "data.on_error=skip")
    assert code == 0
    final = tmp_path / "runs" / "tiny" / "label-ai" / "final"
    assert json.loads((final / "summary.json").read_text())["ranked"] == 2
    rows = [json.loads(r) for r in (final / "rankings.jsonl").read_text().splitlines()]
    assert [r["completions"] for r in rows] == [["a short one", "a much longer answer here"],
                                                ["one answer", "another answer, longer"]]
    assert {r["provenance"]["model"] for r in rows} == {"given"}  # ranked as given, nothing sampled


@pytest.mark.parametrize("rows, expected", [
    ([b'{"prompt": "caf\xe9", "completion": "x", "label": true}', {"prompt": "p", "completion": "c", "label": True}],
     "kto"),
    ([b"not json", PAIR], "preference"),
    ([b"[1, 2]", RANKED | {"rankings": [{"ranks": [1, 2, 3]}]}], "ranking"),
    ([b"{oops", b"\xff"], None),
])
def test_file_format_is_detected_from_the_first_record_that_parses(tmp_path, rows, expected):
    from alignkit.data.formats import detect_file_format

    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl(*rows))
    assert detect_file_format(str(path)) == expected


def test_first_parsed_gives_every_record_back(tmp_path):
    from alignkit.data.io import first_parsed, read_records

    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl(b"\xff", b"{bad", GOOD, GOOD))
    first, records = first_parsed(read_records(str(path)))
    assert first.location == "line 3"
    assert [r.location for r in records] == ["line 1", "line 2", "line 3", "line 4"]


# --------------------------------------------------------------------------- 5. rewards that return no numbers


def text_scores(prompts, responses):
    return [str(len(r) / 100) for r in responses]  # '0.5': numpy would read it as a number


def bool_scores(prompts, responses):
    return [len(r) > 5 for r in responses]


def numpy_bool_scores(prompts, responses):
    import numpy as np

    return np.array([len(r) > 5 for r in responses])


def one_bool_among_numbers(prompts, responses):
    return [0.5] * (len(responses) - 1) + [False]


def numpy_numbers(prompts, responses):
    import numpy as np

    return [np.float32(len(r)) if i % 2 else np.int64(len(r)) for i, r in enumerate(responses)]


@pytest.mark.parametrize("fn, shown", [
    ("text_scores", "returned '0.11' (str) for response 0"),
    ("bool_scores", "returned True (bool) for response 0"),
    ("numpy_bool_scores", "returned True (bool) for response 0"),
    ("one_bool_among_numbers", "returned False (bool) for response 2"),
])
def test_a_python_reward_returning_text_or_booleans_is_a_one_line_error(tmp_path, capsys, fn, shown):
    path = tmp_path / "completions.jsonl"
    path.write_bytes(jsonl({"prompt": "p", "completions": ["Hello there", "Go away now", "Hi"]}))
    spec = f"python:{__name__}:{fn}"
    code, err = run(capsys, *stage("label-ai", tmp_path, path, f"reward={spec}"))
    assert code == 2 and f"reward '{spec}' {shown}" in err and "one number (int or float) per response" in err


def test_a_python_reward_returning_text_fails_eval_too(tmp_path, capsys):
    spec = f"python:{__name__}:text_scores"
    code, err = run(capsys, "eval", "--config", str(CONFIGS / "eval-tiny.yaml"), f"run.output_dir={tmp_path}",
                    f"toxicity.scorer={spec}", "prompts.limit=2")
    assert code == 2 and spec in err and "(str) for response" in err


def test_numpy_numbers_and_numeric_arrays_are_scores(tmp_path, capsys):
    import numpy as np

    from alignkit.rewards import check_scores

    path = tmp_path / "completions.jsonl"
    path.write_bytes(jsonl({"prompt": "p", "completions": ["Hello there", "Go away now", "Hi"]}))
    code, err = run(capsys, *stage("label-ai", tmp_path, path, f"reward=python:{__name__}:numpy_numbers"))
    assert code == 0, err
    assert check_scores("r", np.array([1, 2], dtype=np.int32), 2).tolist() == [1.0, 2.0]
    assert check_scores("r", np.array([0.5, 0.25], dtype=object), 2).tolist() == [0.5, 0.25]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for bad in (["0.5", "1"], [True, 0.5], [None, 1.0], np.array(["1", "2"]), [np.bool_(True), 1.0]):
            with pytest.raises(Exception, match="a reward returns one number"):
                check_scores("r", bad, 2)
