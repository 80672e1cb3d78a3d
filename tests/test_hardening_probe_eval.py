"""Bad input to eval, generate, chat, label-ai, cai, run, the judges and reward specs, class by class:
a one-line error (exit 2) naming the file, flag, key or field, found before the work it would spoil;
never a traceback, never a silently ignored typo, never a run that exits 0 with nothing in it.

1. generate's --out: a folder, or a path under a file (checked before the model loads), and chat's
   empty message;
2. reward specs: a rule without its argument, a python: target that is not a function (reward and
   eval judge), an argument to a kind that takes none, an unknown key beside a mapping spec, weights
   whose sum overflows;
3. the judge cache: a damaged file found while reading is an error naming it; a row that does not
   read back as an answer of the call's shape is asked again; a pairwise fallback of 'Error' is 'error';
4. pipeline files: no stages, a stage without name or stage, a name ${...} cannot name, a reference
   that is not one (${a.fnal}); every stage's config and references checked before the first stage
   runs (a later stage's bad key or a forward reference used to fail after the earlier stages ran);
5. eval: a human evaluation summary with no judgements is an error; with one prompt (overall or of a
   kind) the '-' intervals are explained by a warning line beside the table;
6. constitutions: a preference that is not text, a principle name used twice, an unknown top-level field.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from alignkit import cli
from alignkit.errors import AlignkitError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PROMPTS = str(ROOT / "tests" / "data" / "prompts.jsonl")
PROMPT = [{"role": "user", "content": "Say something about my neighbour."}]

pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *args) -> tuple[int, str, str]:
    """``alignkit ARGS``: (exit code, stdout, stderr); a failure must be one line without a traceback."""
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    if code:
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return code, out, err


# --------------------------------------------------------------------------- 1. generate --out, chat


def test_generate_out_that_is_a_folder_or_under_a_file_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from alignkit.recipes import chat

    def never(*a, **k):
        raise AssertionError("the model loaded before --out was checked")

    monkeypatch.setattr(chat, "_load", never)
    folder = tmp_path / "out"
    folder.mkdir()
    code, _, err = run(capsys, "generate", "--model", "tiny:llama", "--prompts", PROMPTS, "--out", folder)
    assert code == 2 and f"--out {folder}: is a folder" in err
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    code, _, err = run(capsys, "generate", "--model", "tiny:llama", "--prompts", PROMPTS,
                       "--out", blocker / "c.jsonl")
    assert code == 2 and f"{blocker} is a file, not a folder" in err


def test_generate_out_in_a_missing_folder_still_writes(tmp_path, capsys):
    out = tmp_path / "new" / "sub" / "c.jsonl"
    code, _, _ = run(capsys, "generate", "--model", "tiny:llama", "--prompts", PROMPTS, "--max-new-tokens", 2,
                     "--out", out)
    assert code == 0 and len(out.read_text().splitlines()) == 3


@pytest.mark.parametrize("message", ["", "   "])
def test_chat_with_an_empty_message_is_an_error(capsys, message):
    code, out, err = run(capsys, "chat", "--model", "tiny:llama", "--max-new-tokens", 2, message)
    assert code == 2 and "chat: the message is empty" in err and "assistant:" not in out


# --------------------------------------------------------------------------- 2. reward specs


@pytest.mark.parametrize("spec, message", [
    ("rule:token_share", "'rule:token_share' needs a word"),
    ("python:os:path", "python reward 'os:path': path is a module, not a function"),
    ("profanity:invert", "'profanity' takes no argument"),
    ("helpfulness:strict", "'helpfulness' takes no argument"),
    ({"weighted": [{"reward": "profanity"}], "normalise": "batch"}, "unknown key(s) normalise beside 'weighted'"),
    ({"gated": {"safety": "profanity", "helpfulness": "rule:length"}, "threshold": 0.5},
     "unknown key(s) threshold beside 'gated'"),
    ({"weighted": [{"reward": "profanity", "weight": 1e308}, {"reward": "rule:length", "weight": 1e308}]},
     "the weights sum past the float range"),
])
def test_reward_spec_mistakes_are_errors_when_built(spec, message):
    from alignkit.rewards import build_reward

    with pytest.raises(AlignkitError) as e:
        build_reward(spec)
    assert message in str(e.value)


def test_reward_spec_options_beside_a_mapping_still_build():
    from alignkit.rewards import build_reward

    assert build_reward({"weighted": [{"reward": "profanity"}], "normalize": "none"}).normalize == "none"
    gated = build_reward({"gated": {"safety": "profanity", "helpfulness": "rule:length"}, "safety_scale": "probability"})
    assert gated.safety_scale == "probability"


def test_a_reward_spec_typo_stops_label_ai_before_sampling(tmp_path, capsys):
    code, out, err = run(capsys, "label-ai", "--config", CONFIGS / "label-ai-tiny.yaml",
                         f"run.output_dir={tmp_path}", "reward=rule:token_share")
    assert code == 2 and "needs a word" in err and "sampling" not in out


def test_an_eval_python_judge_that_is_not_a_function_is_an_error():
    from alignkit.eval.metrics import build_pairwise_judge

    with pytest.raises(AlignkitError, match="judge 'python:os:path': path is a module, not a function"):
        build_pairwise_judge("python:os:path")


# --------------------------------------------------------------------------- 3. the judge cache


class ScriptedBackend:
    def __init__(self, answer, id="stub"):
        self.answer, self.id, self.calls = answer, id, 0

    def complete(self, conversations, gen, seed=0):
        self.calls += len(conversations)
        return [self.answer(c[-1]["content"]) for c in conversations]

    def option_logprobs(self, conversations, options, prefix=""):
        self.calls += len(conversations)
        return [self.answer(c[-1]["content"]) for c in conversations]


def _judge(tmp_path, backend, **kw):
    from alignkit.judges import JudgeConfig, build_judge

    return build_judge(JudgeConfig(cache_dir=str(tmp_path / "cache"), **kw), backend=backend)


def test_a_judge_cache_damaged_inside_is_a_one_line_error_naming_it(tmp_path):
    backend = ScriptedBackend(lambda q: "Score: 4")
    judge = _judge(tmp_path, backend, template="quality")
    judge.score([PROMPT], ["a reply"])
    db = tmp_path / "cache" / "verdicts.sqlite"
    with sqlite3.connect(db) as con:  # another table under the name: opens, then fails on the first read
        con.execute("DROP TABLE verdicts")
        con.execute("CREATE TABLE verdicts (other TEXT)")
    with pytest.raises(AlignkitError) as e:
        _judge(tmp_path, backend, template="quality").score([PROMPT], ["a reply"])
    assert f"{db}: cannot read the judge cache" in str(e.value) and "cache: false" in str(e.value)
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("stored", ['{"answer": "Score', '{"verdict": "Score: 4"}', '{"answer": 4}'])
def test_a_cached_row_that_does_not_read_back_is_asked_again(tmp_path, stored):
    backend = ScriptedBackend(lambda q: "Score: 4")
    judge = _judge(tmp_path, backend, template="quality")
    assert judge.score([PROMPT], ["a reply"]).tolist() == [4.0] and backend.calls == 1
    with sqlite3.connect(tmp_path / "cache" / "verdicts.sqlite") as con:
        con.execute("UPDATE verdicts SET value = ?", (stored,))  # cut short, or not an answer of text
    again = _judge(tmp_path, backend, template="quality")
    assert again.score([PROMPT], ["a reply"]).tolist() == [4.0]
    assert backend.calls == 2 and again.stats.cached == 0
    assert _judge(tmp_path, backend, template="quality").score([PROMPT], ["a reply"]).tolist() == [4.0]
    assert backend.calls == 2  # the row was replaced: the third run reads it


def test_a_cached_logprob_answer_of_the_wrong_shape_is_asked_again(tmp_path):
    backend = ScriptedBackend(lambda q: [-0.1, -2.5])
    judge = _judge(tmp_path, backend, template="pairwise", mode="logprob")
    judge.compare([PROMPT], ["a"], ["b"])
    assert backend.calls == 2
    with sqlite3.connect(tmp_path / "cache" / "verdicts.sqlite") as con:
        con.execute("UPDATE verdicts SET value = ?", (json.dumps({"answer": "(A)"}),))
    verdict = _judge(tmp_path, backend, template="pairwise", mode="logprob").compare([PROMPT], ["a"], ["b"])[0]
    assert backend.calls == 4 and 0.0 <= verdict.p_a <= 1.0


def test_a_pairwise_fallback_of_error_in_capitals_stops_on_an_unreadable_answer(tmp_path):
    judge = _judge(tmp_path, ScriptedBackend(lambda q: "hmm"), template="pairwise", fallback="Error")
    with pytest.raises(AlignkitError, match="cannot read \\(A\\) or \\(B\\)"):
        judge.compare([PROMPT], ["a"], ["b"])


# --------------------------------------------------------------------------- 4. pipeline files


def _pipeline(tmp_path, body: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(f"name: x\noutput_dir: {tmp_path / 'runs'}\n" + body)
    return p


LABEL = ("{name: label, stage: label-ai, config: {model: {name: 'tiny:llama'}, data: {path: 'builtin:prompts', "
         "kind: red_team, limit: 2}, generation: {max_new_tokens: 4}, k: 2, reward: 'rule:length:10'}}")


@pytest.mark.parametrize("body, message", [
    ("", "no stages: give 'stages'"),
    ("stages: []\n", "no stages"),
    ("stages:\n  - {stage: rm}\n", "'stages[0].name' is missing or empty"),
    ("stages:\n  - {name: a}\n", "'stages[0].stage' is missing or empty"),
    ("stages:\n  - {name: a.b, stage: rm}\n", "'stages[0].name': 'a.b' cannot be named by ${...}"),
    (f"stages:\n  - {LABEL}\n  - {{name: rm, stage: rm, config: {{data: {{path: '${{label.fnal}}/pairs.jsonl'}}}}}}\n",
     "stage 'rm': '${label.fnal}' is not a reference"),
    (f"stages:\n  - {LABEL}\n  - {{name: rm, stage: rm, config: {{data: {{pth: x}}}}}}\n",
     "stage 'rm': unknown config key 'data.pth'"),
    ((f"stages:\n  - {LABEL}\n  - {{name: rm, stage: rm, config: {{data: {{path: '${{dpo.final}}/p.jsonl'}}}}}}\n"
      "  - {name: dpo, stage: dpo}\n"), "stage 'rm': '${dpo}' names no earlier stage"),
    (f"stages:\n  - {LABEL}\n  - {{name: ppo, stage: ppo, config: {{ppo: {{rollout_batch_size: 3, minibatch_size: 2}}}}}}\n",
     "stage 'ppo': ppo.minibatch_size=2 must divide"),
])
def test_pipeline_mistakes_fail_before_any_stage_runs(tmp_path, capsys, body, message):
    code, out, err = run(capsys, "run", _pipeline(tmp_path, body))
    assert code == 2 and message in err, err
    assert "running" not in out and not (tmp_path / "runs").exists()  # the first stage never started


# --------------------------------------------------------------------------- 5. eval


def _eval(tmp_path, *overrides):
    return ["eval", "--config", CONFIGS / "eval-tiny.yaml", f"run.output_dir={tmp_path}",
            "generation.max_new_tokens=4", *overrides]


def test_eval_human_summary_without_judgements_is_an_error(tmp_path, capsys):
    summary = tmp_path / "winloss_summary.json"
    summary.write_text(json.dumps({"model_a": "start", "model_b": "tuned", "wins": 0, "ties": 0, "losses": 0}))
    code, out, err = run(capsys, *_eval(tmp_path, "prompts.limit=2", f"judge=human:{summary}",
                                        "pairwise=[{model_a: start, model_b: tuned}]"))
    assert code == 2 and f"{summary}: field 'wins': the summary holds no judgements" in err
    assert "report:" not in out


def test_eval_with_one_prompt_says_why_its_intervals_are_missing(tmp_path, capsys):
    code, out, _ = run(capsys, *_eval(tmp_path, "prompts.limit=1"))
    assert code == 0
    assert "eval: warning: 1 prompt: no intervals or paired tests (they need at least 2 prompts)" in out
    assert out.strip().splitlines()[-1].startswith("report:")


def test_eval_thin_sample_warnings_by_kind():
    from alignkit.recipes.eval import _thin_sample_warnings

    assert _thin_sample_warnings(["helpful", "helpful"]) == []
    assert _thin_sample_warnings([None, None, None]) == []
    (line,) = _thin_sample_warnings(["helpful", "helpful", "red_team"])
    assert "one prompt of kind red_team" in line


# --------------------------------------------------------------------------- 6. constitutions


@pytest.mark.parametrize("text, message", [
    ("principles:\n  - {name: a, critique: c, revision: r, preference: [x, y]}\n",
     "principles[0]: field 'preference' must be a non-empty text"),
    ("principles:\n  - {name: a, critique: c, revision: r}\n  - {name: a, critique: c2, revision: r2}\n",
     "principles[1]: field 'name': 'a' is used twice"),
    ("principles:\n  - {name: a, critique: c, revision: r}\nnmae: mine\n", "unknown field(s) nmae"),
])
def test_constitution_mistakes_name_the_file_principle_and_field(tmp_path, text, message):
    from alignkit.recipes.cai import load_constitution

    f = tmp_path / "mine.yaml"
    f.write_text(text)
    with pytest.raises(AlignkitError) as e:
        load_constitution(str(f))
    assert str(e.value).startswith(str(f)) and message in str(e.value)
