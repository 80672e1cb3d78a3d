"""Bad data files and configs for the training stages, class by class: every member a one-line
error (exit 2) naming the file, line (row) and field, or the config key; never a traceback, a
record silently dropped or misread, or a setting silently ignored.

Classes:

1. a key given twice in one JSON object (a JSONL line, a .json item, a CSV cell holding JSON): the
   parser kept the last value without a word;
2. a key given twice in one YAML mapping (a config file): the last won silently;
   and YAML errors, which spanned several lines;
3. a ranking's true/false and name fields of the wrong type: ``"cant_rank": "false"`` (text) was
   truthy, so a ranked item was dropped as can't-rank; a labeler that is an object was
   stringified;
4. a preference margin out of range: a negative one (rejected may score higher) trained silently,
   one past float32's range stopped at step 1 with an error naming no record;
5. a data setting that a stage ignored: ``data.kind`` in sft, KTO and synthetic data (every
   record trained), ``data.format`` in the stages that sample from prompts (ppo, rl, best-of-n);
6. ``model.lora.target_modules`` that match no module (or none given): peft's traceback;
7. a run folder that cannot be created (``run.output_dir`` is a file): a traceback;
8. ``--resume`` over a ``metrics.jsonl`` whose last line was cut short by a kill: a traceback;
9. ``builtin:prompts`` with a split or kind it does not have: a ValueError traceback;
10. two prompts under one ``id`` in a prompt file: accepted, so samples and provenance could not
    tell them apart;
11. a conversation the model's chat template refuses (many raise on a system message or on roles
    that do not alternate): jinja's traceback;
12. ``model.name`` a local path that does not exist, a file, or a folder with no saved model:
    transformers' hub-id rules ("Repo id must be in the form ...") or a tokenizer backend error.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from test_hardening import (
    run,  # alignkit ARGS -> (exit code, stderr), a failure one line
)

from alignkit.data.io import DataWarning

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = {"prompt": "Say hi", "completion": "Hello there, nice to meet you."}
PAIR = {"prompt": "Say hi", "chosen": "Hello there, nice to meet you.", "rejected": "Go away."}
KTO = {"prompt": "Greet me.", "completion": "Hello, nice to see you!", "label": True}


def jsonl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def write(tmp_path, name: str, content: bytes | str) -> Path:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


def stage(name: str, tmp_path, *overrides, config: str | None = None) -> list[str]:
    extra = {"sft": ["train.max_steps=1", "data.eval_fraction=0"],
             "rm": ["train.max_steps=1", "data.eval_fraction=0"],
             "dpo": ["train.max_steps=1", "data.eval_fraction=0"],
             "ppo": ["ppo.steps=1"], "rl": ["rl.steps=1"],
             "best-of-n": ["train.max_steps=1"]}[name]
    return [name, "--config", str(CONFIGS / (config or f"{name}-tiny.yaml")),
            f"run.output_dir={tmp_path / 'runs'}", *extra, *overrides]


# --------------------------------------------------------------------------- 1. repeated JSON keys


@pytest.mark.parametrize("name, content, where", [
    ("twice.jsonl", jsonl(GOOD, b'{"prompt": "a", "completion": "b", "completion": "c"}'), "twice.jsonl:line 2: "),
    ("twice.json", b'[{"prompt": "a", "completion": "b"},\n {"prompt": "a", "completion": "b", "completion": "c"}]',
     "twice.json: "),
    ("twice.csv", (b'prompt,completion\nSay hi,Hello\na,"[{""role"": ""assistant"", ""content"": ""x"", '
                   b'""content"": ""y""}]"\n'), "twice.csv:row 3: field 'completion': "),
])
def test_a_key_given_twice_in_a_json_object_is_a_located_error(tmp_path, capsys, name, content, where):
    p = write(tmp_path, name, content)
    code, err = run(capsys, *stage("sft", tmp_path, f"data.path={p}"))
    assert code == 2
    assert where in err and "is given twice" in err, err


def test_a_record_with_a_key_given_twice_is_skipped_and_counted_with_on_error_skip(tmp_path, capsys):
    p = write(tmp_path, "twice.jsonl", jsonl(PAIR, b'{"prompt": "a", "chosen": "b", "chosen": "c", "rejected": "d"}'))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _ = run(capsys, *stage("rm", tmp_path, f"data.path={p}", "data.on_error=skip"))
    assert code == 0
    shown = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert any("skipped 1 of 2" in m and "line 2" in m and "'chosen' is given twice" in m for m in shown), shown


# --------------------------------------------------------------------------- 2. YAML configs


@pytest.mark.parametrize("text, expected", [
    ("model: {name: tiny:llama}\nmodel: {name: tiny:gpt2}\n", "line 2, column 1: key 'model' is given twice"),
    ("train:\n  batch_size: 2\n  batch_size: 4\n", "line 3, column 3: key 'batch_size' is given twice"),
    ("model: a: b\n", "invalid YAML at line 1, column 9: mapping values are not allowed here"),
    ("!!python/object:os.system {}\n", "invalid YAML at line 1, column 1: could not determine a constructor"),
])
def test_config_yaml_problems_are_one_line_errors_naming_file_and_line(tmp_path, capsys, text, expected):
    p = write(tmp_path, "cfg.yaml", text)
    code, err = run(capsys, "sft", "--config", str(p), "--print-config")
    assert code == 2
    assert f"{p}: " in err and expected in err, err


def test_yaml_merge_keys_are_not_taken_for_repeated_keys(tmp_path, capsys):
    p = write(tmp_path, "cfg.yaml", "base: &b {learning_rate: 0.5}\ntrain:\n  <<: *b\n  batch_size: 3\n")
    from alignkit.data.io import read_yaml

    assert read_yaml(p)["train"] == {"learning_rate": 0.5, "batch_size": 3}


# --------------------------------------------------------------------------- 3. ranking field types

RANKED = {"prompt": "Describe the sea.", "completions": ["The sea is vast and blue.", "Water."]}


def test_cant_rank_given_as_text_is_read_as_true_or_false(tmp_path, capsys):
    """``"cant_rank": "false"`` is a ranked item (it was dropped as can't-rank: non-empty text is truthy)."""
    p = write(tmp_path, "ranks.jsonl", jsonl({**RANKED, "rankings": [{"labeler": "a", "cant_rank": "false",
                                                                        "ranks": [1, 2]}]}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # "gave no pairs" would fail the test
        code, err = run(capsys, *stage("rm", tmp_path, f"data.path={p}"))
    assert code == 0, err


@pytest.mark.parametrize("ranking, field, problem", [
    ({"labeler": "a", "cant_rank": 1, "ranks": [1, 2]}, "rankings[0].cant_rank", "must be true or false, got 1"),
    ({"labeler": "a", "cant_rank": "maybe"}, "rankings[0].cant_rank", "must be true or false, got 'maybe'"),
    ({"labeler": {"name": "a"}, "ranks": [1, 2]}, "rankings[0].labeler", "must be a name"),
    ({"labeler": " ", "ranks": [1, 2]}, "rankings[0].labeler", "must be a name"),
])
def test_ranking_fields_of_the_wrong_type_are_located_errors(tmp_path, capsys, ranking, field, problem):
    p = write(tmp_path, "ranks.jsonl", jsonl(PAIR, {**RANKED, "rankings": [ranking]}))
    code, err = run(capsys, *stage("rm", tmp_path, f"data.path={p}"))
    assert code == 2
    assert f"ranks.jsonl:line 2: field '{field}': {problem}" in err, err


def test_kto_label_text_true_false_is_read_and_other_text_is_an_error(tmp_path, capsys):
    ok = write(tmp_path, "kto.jsonl", jsonl(KTO, {**KTO, "completion": "Ugh.", "label": "FALSE"}))
    assert run(capsys, *stage("dpo", tmp_path, f"data.path={ok}", "loss.type=kto"))[0] == 0
    bad = write(tmp_path, "bad.jsonl", jsonl(KTO, {**KTO, "completion": "Ugh.", "label": "no"}))
    code, err = run(capsys, *stage("dpo", tmp_path, f"data.path={bad}", "loss.type=kto"))
    assert code == 2 and "bad.jsonl:line 2: field 'label': must be true or false, got 'no'" in err, err


# --------------------------------------------------------------------------- 4. margins


@pytest.mark.parametrize("margin, problem", [
    (-1.5, "must be >= 0"),
    ("-2", "must be >= 0"),
    (1e300, "must be at most 3.4e+38"),
])
def test_a_margin_out_of_range_is_a_located_error(tmp_path, capsys, margin, problem):
    p = write(tmp_path, "prefs.jsonl", jsonl(PAIR, {**PAIR, "margin": margin}))
    code, err = run(capsys, *stage("rm", tmp_path, f"data.path={p}", "use_margin=true"))
    assert code == 2
    assert f"prefs.jsonl:line 2: field 'margin': {problem}" in err, err


def test_margins_in_range_still_train(tmp_path, capsys):
    p = write(tmp_path, "prefs.jsonl", jsonl({**PAIR, "margin": 0}, {**PAIR, "margin": "2.5"}))
    assert run(capsys, *stage("rm", tmp_path, f"data.path={p}", "use_margin=true"))[0] == 0


# --------------------------------------------------------------------------- 5. settings a stage ignored


def test_sft_with_a_data_kind_no_record_has_is_an_error(tmp_path, capsys):
    p = write(tmp_path, "sft.jsonl", jsonl({**GOOD, "kind": "helpful"}, {**GOOD, "kind": "red_team"},
                                           {**GOOD, "kind": "helpful"}))
    code, err = run(capsys, *stage("sft", tmp_path, f"data.path={p}", "data.kind=other"))
    assert code == 2 and "sft.jsonl: no usable SFT records of kind 'other'" in err, err


def test_sft_trains_on_the_records_of_data_kind_only(tmp_path, capsys):
    from alignkit.config import load_config
    from alignkit.recipes.sft import Config, load_demonstrations

    p = write(tmp_path, "sft.jsonl", jsonl({**GOOD, "kind": "helpful"}, {"prompt": "Be rude", "completion": "No.",
                                                                        "kind": "red_team"}))
    cfg = load_config(Config, CONFIGS / "sft-tiny.yaml", [f"data.path={p}", "data.kind=red_team",
                                                          "data.eval_fraction=0"])
    train, _ = load_demonstrations(cfg.data, 0)
    assert [ex.completion for ex in train] == ["No."]


def test_kto_keeps_only_the_records_of_data_kind(tmp_path, capsys):
    p = write(tmp_path, "kto.jsonl", jsonl({**KTO, "kind": "helpful"}))
    code, err = run(capsys, *stage("dpo", tmp_path, f"data.path={p}", "loss.type=kto", "data.kind=red_team"))
    assert code == 2 and "kto.jsonl: no usable KTO records of kind 'red_team'" in err, err


@pytest.mark.parametrize("name", ["sft", "rm", "dpo"])
def test_data_kind_on_synthetic_data_is_an_error(tmp_path, capsys, name):
    code, err = run(capsys, *stage(name, tmp_path, "data.kind=red_team"))
    assert code == 2
    assert "data.kind='red_team': synthetic:polite_vs_rude" in err and "no kinds" in err, err


@pytest.mark.parametrize("name, config, key", [
    ("ppo", None, "data.prompts.format"),
    ("rl", "rl-grpo-tiny.yaml", "data.prompts.format"),
    ("best-of-n", None, "data.format"),
])
def test_a_prompt_stage_refuses_a_data_format_it_would_ignore(tmp_path, capsys, name, config, key):
    path_key = key.replace("format", "path")
    code, err = run(capsys, *stage(name, tmp_path, f"{path_key}={ROOT / 'tests/data/prompts.jsonl'}",
                                   f"{key}=kto", config=config))
    assert code == 2
    assert f"{key} must be prompts (or auto)" in err and "got 'kto'" in err, err


# --------------------------------------------------------------------------- 6. LoRA target modules


@pytest.mark.parametrize("value, expected", [
    ("nope_proj", "model.lora.target_modules='nope_proj': Target modules nope_proj not found"),
    ("5", "model.lora.target_modules='5'"),
    ("[]", "model.lora.target_modules: give 'all-linear' or a list of module names"),
    ("''", "model.lora.target_modules: give 'all-linear' or a list of module names"),
])
def test_lora_target_modules_that_match_nothing_are_one_line_errors(tmp_path, capsys, value, expected):
    code, err = run(capsys, *stage("sft", tmp_path, "model.lora.enabled=true", f"model.lora.target_modules={value}"))
    assert code == 2 and expected in err, err


# --------------------------------------------------------------------------- 7. run folders


@pytest.mark.parametrize("below", ["", "sub"])
def test_an_output_dir_that_is_a_file_is_a_one_line_error(tmp_path, capsys, below):
    blocker = write(tmp_path, "afile", "x")
    out = blocker / below if below else blocker
    code, err = run(capsys, "sft", "--config", str(CONFIGS / "sft-tiny.yaml"), f"run.output_dir={out}",
                    "train.max_steps=1")
    assert code == 2
    assert "run.output_dir: cannot create the run folder" in err and f"{blocker} is a file, not a folder" in err, err


# --------------------------------------------------------------------------- 8. resume over a torn log line


def test_resume_over_a_metrics_line_cut_short_continues(tmp_path, capsys):
    common = ["run.name=cut", "train.save_every=2", "data.eval_fraction=0"]
    assert run(capsys, "sft", "--config", str(CONFIGS / "sft-tiny.yaml"), f"run.output_dir={tmp_path / 'runs'}",
               "train.max_steps=2", *common)[0] == 0
    log = tmp_path / "runs" / "cut" / "sft" / "metrics.jsonl"
    with log.open("a") as f:
        f.write('{"step": 3, "lo')  # killed mid-write
    code, err = run(capsys, "sft", "--config", str(CONFIGS / "sft-tiny.yaml"), f"run.output_dir={tmp_path / 'runs'}",
                    "train.max_steps=4", *common, "--resume")
    assert code == 0, err
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- 9. builtin:prompts' split and kind


@pytest.mark.parametrize("args, message", [
    (["eval", "--config", str(CONFIGS / "eval-tiny.yaml"), "prompts.path=builtin:prompts", "prompts.kind=nosuch"],
     "prompts.kind: builtin:prompts has no kind 'nosuch' (its kinds: helpful, red_team)"),
    (["eval", "--config", str(CONFIGS / "eval-tiny.yaml"), "prompts.path=builtin:prompts", "prompts.split=dev"],
     "prompts.split: builtin:prompts has no split 'dev' (its splits: train, test)"),
    (["rl", "--config", str(CONFIGS / "rl-grpo-tiny.yaml"), "data.prompts.path=builtin:prompts",
      "data.prompts.kind=redteam"], "data.prompts.kind: builtin:prompts has no kind 'redteam'"),
    (["generate", "--model", "tiny:llama", "--prompts", "builtin:prompts", "--split", "nosuch", "--out", "o.jsonl"],
     "--split: builtin:prompts has no split 'nosuch'"),
])
def test_a_builtin_prompt_split_or_kind_that_does_not_exist_names_its_key(tmp_path, capsys, monkeypatch, args,
                                                                           message):
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, *args, f"run.output_dir={tmp_path}" if args[0] != "generate" else "--limit=1")
    assert code == 2 and message in err, err


# --------------------------------------------------------------------------- 10. prompt ids given twice


def test_two_prompts_under_one_id_are_an_error_naming_both_lines(tmp_path, capsys):
    p = write(tmp_path, "prompts.jsonl", jsonl({"id": "a", "prompt": "Say hi"}, {"id": "b", "prompt": "Say bye"},
                                               {"id": "a", "prompt": "Say what"}))
    code, err = run(capsys, *stage("rl", tmp_path, f"data.prompts.path={p}", config="rl-grpo-tiny.yaml"))
    assert code == 2
    assert f"prompts.jsonl:line 3: field 'id': 'a' is also the id of {p}:line 1: ids must be unique" in err, err


def test_prompts_without_ids_or_with_distinct_ids_load(tmp_path):
    from alignkit.data.formats import load_prompts

    p = write(tmp_path, "prompts.jsonl", jsonl({"prompt": "x"}, {"prompt": "x"}, {"id": "1", "prompt": "y"},
                                               {"id": 1.5, "prompt": "z"}))
    assert [e.id for e in load_prompts(str(p))] == [None, None, "1", "1.5"]


def test_a_skipped_duplicate_id_is_counted_like_any_bad_record(tmp_path):
    from alignkit.data.formats import load_prompts

    p = write(tmp_path, "prompts.jsonl", jsonl({"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}))
    with pytest.warns(DataWarning, match="1 of 2"):
        kept = load_prompts(str(p), on_error="skip")
    assert [e.prompt[0]["content"] for e in kept] == ["x"]


# --------------------------------------------------------------------------- 11. a chat template that refuses


STRICT = ("{% for m in messages %}{% if m['role'] == 'system' %}"
          "{{ raise_exception('System role not supported') }}{% endif %}"
          "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture
def strict_model(tmp_path_factory):
    """A tiny model folder whose chat template raises on a system message, as Gemma's does."""
    from alignkit.config import ModelConfig
    from alignkit.models import load_causal_lm, load_tokenizer

    folder = tmp_path_factory.mktemp("strict")
    tok = load_tokenizer("tiny:llama")
    tok.chat_template = STRICT
    load_causal_lm(ModelConfig(name="tiny:llama"), trainable=False, tokenizer=tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


SYSTEM = {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Say hi"},
                       {"role": "assistant", "content": "Hi."}]}


@pytest.mark.parametrize("name, row, field", [
    ("sft", SYSTEM, "prompt"),
    ("dpo", {"prompt": SYSTEM["messages"][:2], "chosen": "Hi.", "rejected": "No."}, "prompt"),
    ("rl", {"prompt": SYSTEM["messages"][:2]}, "prompt"),
])
def test_a_conversation_the_chat_template_refuses_is_a_located_error(tmp_path, capsys, strict_model, name, row,
                                                                     field):
    fine = {"sft": GOOD, "dpo": PAIR, "rl": {"prompt": "Say hi"}}[name]
    p = write(tmp_path, "data.jsonl", jsonl(fine, row))
    key = "data.prompts.path" if name == "rl" else "data.path"
    code, err = run(capsys, *stage(name, tmp_path, f"{key}={p}", f"model.name={strict_model}",
                                     config="rl-grpo-tiny.yaml" if name == "rl" else None))
    assert code == 2
    assert f"data.jsonl:line 2: field '{field}': the model's chat template refuses this conversation " in err, err
    assert "System role not supported" in err and "roles: system, user" in err


def test_a_refused_prompt_is_skipped_and_counted_with_on_error_skip(tmp_path, strict_model):
    from alignkit.data.collate import encode_prompts
    from alignkit.data.formats import PromptExample
    from alignkit.models import load_tokenizer

    tok = load_tokenizer(str(strict_model))
    prompts = [PromptExample([{"role": "user", "content": "hi"}], loc="p.jsonl:line 1"),
               PromptExample(SYSTEM["messages"][:2], loc="p.jsonl:line 2")]
    with pytest.warns(DataWarning, match="1 of 2"):
        kept, ids = encode_prompts(tok, prompts, None, on_error="skip")
    assert [k.loc for k in kept] == ["p.jsonl:line 1"] and len(ids) == 1


# --------------------------------------------------------------------------- 12. a model path that is no model


@pytest.mark.parametrize("name, message", [
    ("{tmp}/no/such/model", "cannot load model '{tmp}/no/such/model': the folder {tmp}/no/such/model does not exist"),
    ("./no-such-model", "the folder ./no-such-model does not exist"),
    ("{tmp}/afile", "the folder {tmp}/afile is a file, not a model folder"),
    ("{tmp}/empty", "cannot load model folder {tmp}/empty: it holds no config.json or tokenizer files"),
])
def test_a_model_path_that_holds_no_model_says_so(tmp_path, capsys, monkeypatch, name, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    code, err = run(capsys, *stage("sft", tmp_path, f"model.name={name.format(tmp=tmp_path)}"))
    assert code == 2 and message.format(tmp=tmp_path) in err, err
