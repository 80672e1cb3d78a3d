"""Bad input at the command line and in a run folder, class by class: a one-line error (exit 2) that
names the flag, spec, key or file, or a damaged file passed over / recomputed with a message; never a
traceback, and never a run that exits 0 with nonsense.

1. generate / chat flags (checked through the config ranges, like a YAML key);
2. numbers in a rule reward spec;
3. judge numbers (fallback, a template's scale), checked when the judge is built, before any sampling;
4. a damaged meta.json in the newest checkpoint: resume from the one before;
5. an unreadable DPO reference cache: computed again;
6. a model folder whose weights cannot be read;
7. label-ai / cai whose judge could read no answer: a warning line (summed over processes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit import cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PROMPTS = str(ROOT / "tests" / "data" / "prompts.jsonl")

pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *args) -> tuple[int, str, str]:
    """``alignkit ARGS``: (exit code, stdout, stderr); a failure must be one line without a traceback."""
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    if code:
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return code, out, err


def label_ai(tmp_path, *overrides):
    return ["label-ai", "--config", CONFIGS / "label-ai-tiny.yaml", f"run.output_dir={tmp_path / 'runs'}", *overrides]


# --------------------------------------------------------------------------- 1. generate / chat flags


@pytest.mark.parametrize("flag, value, expected", [
    ("--batch-size", "0", "--batch-size must be >= 1"),
    ("--batch-size", "-4", "--batch-size must be >= 1"),
    ("--seed", "-1", "--seed must be >= 0"),
    ("--seed", str(2**32), "--seed must be <= 4294967295"),
    ("--n", "0", "--n must be >= 1"),
    ("--n", "-2", "--n must be >= 1"),
    ("--best-of", "-1", "--best-of must be >= 0"),
    ("--limit", "0", "--limit must be >= 1"),
    ("--max-new-tokens", "0", "--max-new-tokens must be >= 1"),
    ("--temperature", "nan", "--temperature must be a finite number"),
    ("--temperature", "inf", "--temperature must be a finite number"),
    ("--temperature", "-inf", "--temperature must be a finite number"),
    ("--temperature", "-1", "--temperature must be > 0"),
    ("--temperature", "0", "--temperature must be > 0"),
])
def test_generate_flags_out_of_range_are_one_line_errors_naming_the_flag(tmp_path, capsys, flag, value, expected):
    out = tmp_path / "gen.jsonl"
    code, stdout, err = run(capsys, "generate", "--model", "tiny:llama", "--prompts", PROMPTS,
                            "--max-new-tokens", "4", f"{flag}={value}", "--out", out)
    assert code == 2 and expected in err and "command line" in err
    assert not out.exists() and "wrote" not in stdout


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--temperature", "-0.5"), ("--seed", "-3"),
                                         ("--max-new-tokens", "-1")])
def test_chat_flags_out_of_range_are_one_line_errors_naming_the_flag(capsys, flag, value):
    code, stdout, err = run(capsys, "chat", "--model", "tiny:llama", f"{flag}={value}", "hello")
    assert code == 2 and f"{flag} must be" in err and "assistant:" not in stdout


def test_generate_flags_in_range_still_run(tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    code, stdout, err = run(capsys, "generate", "--model", "tiny:llama", "--prompts", PROMPTS, "--n", "2",
                            "--batch-size", "1", "--seed", str(2**32 - 1), "--temperature", "0.5", "--limit", "2",
                            "--max-new-tokens", "3", "--out", out)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["completions"]) == 2 for r in rows)


# --------------------------------------------------------------------------- 2. rule reward specs


BAD_RULES = [("rule:length:nan", "must be a finite number"), ("rule:length:inf", "must be a finite number"),
             ("rule:length:-inf", "must be a finite number"), ("rule:length:1e400", "must be a finite number"),
             ("rule:length:0", "must be > 0"), ("rule:length:-3", "must be > 0"),
             ("rule:length:ten", "must be float"), ("rule:length:5:6", "must be float")]


@pytest.mark.parametrize("spec, expected", BAD_RULES)
def test_rule_spec_numbers_are_checked_when_the_reward_is_built(tmp_path, capsys, spec, expected):
    code, _, err = run(capsys, *label_ai(tmp_path, f"reward={spec}"))
    assert code == 2 and f"reward '{spec}'" in err and expected in err
    assert not (tmp_path / "runs" / "tiny" / "label-ai" / "final").exists()  # nothing sampled, nothing written


@pytest.mark.parametrize("spec, expected", BAD_RULES[::3])
def test_rule_spec_numbers_in_other_stages(tmp_path, capsys, spec, expected):
    out = tmp_path / "best.jsonl"
    code, _, err = run(capsys, "generate", "--model", "tiny:llama", "--prompts", PROMPTS, "--best-of", "2",
                       "--reward", spec, "--max-new-tokens", "3", "--out", out)
    assert code == 2 and f"reward '{spec}'" in err and expected in err and not out.exists()
    code, _, err = run(capsys, "best-of-n", "--config", CONFIGS / "best-of-n-tiny.yaml",
                       f"run.output_dir={tmp_path / 'runs'}", f"reward.spec={spec}")
    assert code == 2 and f"reward '{spec}'" in err and expected in err


def test_good_rule_specs_build():
    from alignkit.rewards import build_reward

    assert build_reward("rule:length:2.5").name == "rule:length:2.5"
    assert build_reward("rule:length:10").name == "rule:length:10"
    assert build_reward("rule:length").target == 50.0
    assert build_reward("rule:length:4")([[]] * 2, ["a b", "a b c d e"]).tolist() == [0.5, 1.0]


# --------------------------------------------------------------------------- 3. judge numbers


def judge_reward(**fields) -> str:
    spec = {"judge": {"template": "quality", "model": {"name": "tiny:llama"}, "cache": False, **fields}}
    return "reward=" + json.dumps(spec)


@pytest.mark.parametrize("fallback, expected", [
    ("nan", "'fallback' must be a finite number"), (".nan", "fallback must be midpoint, min, max, error or a number"),
    ("inf", "'fallback' must be a finite number"), ("-inf", "'fallback' must be a finite number"),
    ("7", "'fallback' must be <= 5.0"), ("0.5", "'fallback' must be >= 1.0"),
])
def test_judge_fallback_is_checked_when_the_judge_is_built(tmp_path, capsys, fallback, expected):
    code, _, err = run(capsys, *label_ai(tmp_path, judge_reward(fallback=fallback)))
    assert code == 2 and expected in err
    assert not (tmp_path / "runs" / "tiny" / "label-ai" / "final").exists()  # before the sampling


@pytest.mark.parametrize("scale, expected", [
    ("min: -.inf\nmax: 5", "'min' must be a finite number"),
    ("min: 1\nmax: .inf", "'max' must be a finite number"),
    ("min: .nan\nmax: 5", "'min' must be a finite number"),
    ("min: 1\nmax: 1e400", "'max' must be a finite number"),
    ("min: 5\nmax: 1", "'min' (5.0) must be below 'max' (1.0)"),
    ("min: one\nmax: 5", "'min' must be float"),
    ("max: 5", "a scalar template needs 'min'"),
])
def test_judge_template_scale_is_checked_when_the_judge_is_built(tmp_path, capsys, scale, expected):
    template = tmp_path / "my-judge.txt"
    template.write_text(f"---\nkind: scalar\n{scale}\n---\nRate this answer: {{response}}\n")
    code, _, err = run(capsys, *label_ai(tmp_path, judge_reward(template=str(template))))
    assert code == 2 and f"{template}:1" in err and expected in err
    assert not (tmp_path / "runs" / "tiny" / "label-ai" / "final").exists()


def test_judge_numbers_in_range_build(tmp_path):
    from alignkit.judges import JudgeConfig, build_judge

    for fallback, value in (("1", 1.0), ("5", 5.0), ("2.25", 2.25), ("midpoint", 3.0)):
        judge = build_judge(JudgeConfig(template="quality", fallback=fallback, cache=False), backend=object())
        assert judge.fallback_value() == value


# --------------------------------------------------------------------------- 4. resume past a damaged meta.json


SFT_ARGS = ["train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=3", "data.eval_fraction=0"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """One finished tiny SFT run (checkpoints at steps 2, 3, 4), copied by each test that damages it."""
    base = tmp_path_factory.mktemp("sft")
    assert cli.main(["sft", "--config", str(CONFIGS / "sft-tiny.yaml"), f"run.output_dir={base / 'runs'}",
                     *SFT_ARGS]) == 0
    return base / "runs"


def sft_args(out: Path) -> list:
    return ["sft", "--config", CONFIGS / "sft-tiny.yaml", f"run.output_dir={out}", *SFT_ARGS]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("meta, expected", [
    ("{}", "no field 'step'"),
    ('{"time": 1.0, "extra": {}}', "no field 'step'"),
    ("[]", "must be a JSON object"),
    ("null", "must be a JSON object"),
    ('{"step": "4"}', "field 'step' must be a whole number"),
    ('{"step": -1}', "field 'step' must be a whole number"),
    ('{"step": 4.5}', "field 'step' must be a whole number"),
    ('{"step": 4, "extra": [1]}', "field 'extra' must be a mapping"),
    ("{not json", "not JSON"),
    ("", "not JSON"),
])
def test_resume_passes_over_a_checkpoint_whose_meta_is_damaged(sft_run, tmp_path, capsys, meta, expected):
    runs = tmp_path / "runs"
    shutil.copytree(sft_run, runs)
    run_dir = runs / "tiny" / "sft"
    straight = losses(run_dir)
    (run_dir / "checkpoints" / "step-000004" / "meta.json").write_text(meta)
    (run_dir / "DONE").unlink()
    code, out, err = run(capsys, *sft_args(runs), "--resume")
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if "could not load" in ln)
    assert "could not load step-000004" in line and "meta.json" in line and expected in line
    assert "resuming from step-000003" in line
    assert losses(run_dir) == pytest.approx(straight, abs=1e-6)  # step 4 trained again, as before
    assert (run_dir / "DONE").exists()


def test_every_meta_damaged_is_one_line_error(sft_run, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(sft_run, runs)
    run_dir = runs / "tiny" / "sft"
    for ckpt in (run_dir / "checkpoints").glob("step-*"):
        (ckpt / "meta.json").write_text("{}")
    (run_dir / "DONE").unlink()
    code, _, err = run(capsys, *sft_args(runs), "--resume")
    assert code == 2 and "cannot read checkpoint" in err and "meta.json: no field 'step'" in err


# --------------------------------------------------------------------------- 5. the DPO reference cache


DPO_ARGS = ["train.max_steps=2", "train.save_every=1", "data.eval_fraction=0.1"]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("dpo")
    assert cli.main(["dpo", "--config", str(CONFIGS / "dpo-tiny.yaml"), f"run.output_dir={base / 'runs'}",
                     *DPO_ARGS]) == 0
    return base / "runs"


@pytest.mark.parametrize("damage", ["zero bytes", "cut short", "not safetensors", "bad header"])
def test_unreadable_dpo_reference_cache_is_computed_again(dpo_run, tmp_path, capsys, damage):
    from safetensors.torch import load_file

    runs = tmp_path / "runs"
    shutil.copytree(dpo_run, runs)
    run_dir = runs / "tiny" / "dpo"
    cache = run_dir / "ref_logps.safetensors"
    original = {k: v.tolist() for k, v in load_file(str(cache)).items()}  # read now: the file is mapped
    data = cache.read_bytes()
    if damage == "zero bytes":
        cache.write_bytes(b"")
    elif damage == "cut short":
        cache.write_bytes(data[:len(data) // 2])
    elif damage == "not safetensors":
        cache.write_bytes(b"\x00" * 8 + b"hello")
    else:
        cache.write_bytes(data[:8] + b"{" * (len(data) - 8))  # the header length kept, the header not JSON
    (run_dir / "DONE").unlink()
    shutil.rmtree(run_dir / "checkpoints" / "step-000002")  # resume at step 1: the cache is used for training
    code, out, err = run(capsys, "dpo", "--config", CONFIGS / "dpo-tiny.yaml", f"run.output_dir={runs}", *DPO_ARGS,
                         "--resume")
    assert code == 0, err
    assert f"cannot read the reference cache {cache}" in out and "computing it again" in out
    again = load_file(str(cache))
    assert set(again) == set(original)
    for k in original:
        assert again[k].tolist() == pytest.approx(original[k], abs=1e-5)
    assert (run_dir / "DONE").exists()


# --------------------------------------------------------------------------- 6. model folders that cannot load


@pytest.mark.parametrize("damage", ["zero bytes", "cut short", "not safetensors", "config not JSON"])
def test_model_folder_with_unreadable_weights_is_one_line_error(sft_run, tmp_path, capsys, damage):
    folder = tmp_path / "model"
    shutil.copytree(sft_run / "tiny" / "sft" / "final", folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    if damage == "zero bytes":
        weights.write_bytes(b"")
    elif damage == "cut short":
        weights.write_bytes(data[:len(data) // 2])
    elif damage == "not safetensors":
        weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    else:
        (folder / "config.json").write_text("{not json")
    out = tmp_path / "gen.jsonl"
    code, _, err = run(capsys, "generate", "--model", folder, "--prompts", PROMPTS, "--max-new-tokens", "3",
                       "--out", out)
    assert code == 2 and str(folder) in err and not out.exists()
    code, _, err = run(capsys, "chat", "--model", folder, "--max-new-tokens", "3", "hello")
    assert code == 2 and str(folder) in err


# --------------------------------------------------------------------------- 7. judges that read nothing


UNREADABLE = judge_reward(generation={"max_new_tokens": 4})  # a random tiny model never writes a grade


def test_label_ai_stops_when_every_judge_answer_is_unreadable(tmp_path, capsys):
    # Every answer unreadable: every completion gets the fallback score, so no pair can be written.
    # That is an error naming the judge as the cause, not a finished run with an empty pairs.jsonl.
    code, out, err = run(capsys, *label_ai(tmp_path, UNREADABLE))
    assert code == 2
    assert "label-ai: no pairs to write: the completions of 6 of 6 prompts all scored alike" in err
    assert "(every judgement had an answer the judge's parser could not read" in err
    assert not (tmp_path / "runs" / "tiny" / "label-ai" / "final" / "pairs.jsonl").exists()


def test_label_ai_without_judge_problems_has_no_warning(tmp_path, capsys):
    code, out, err = run(capsys, *label_ai(tmp_path))
    assert code == 0, err
    assert "-> " in out and "warning" not in out


def test_cai_warns_when_every_judge_answer_is_unreadable(tmp_path, capsys):
    code, out, err = run(capsys, "cai", "--config", CONFIGS / "cai-tiny.yaml", f"run.output_dir={tmp_path}",
                         "supervised.fine_tune=false", "supervised.rounds=1", "feedback.judge.mode=generate",
                         "feedback.judge.generation.max_new_tokens=4", "feedback.judge.cache=false")
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if "warning:" in ln]
    assert len(lines) == 1 and lines[0].startswith("alignkit cai: warning: every comparison had an answer the "
                                                   "judge's parser could not read and counted as a tie")


def test_judge_stats_warning_wording():
    from alignkit.judges import JudgeStats

    assert JudgeStats(asked=4).warning("judgement", "got the fallback") is None
    some = JudgeStats(asked=4, unparsable=1, examples=["??"]).warning("judgement", "got the fallback")
    assert some.startswith("1 of 4 judgements had an answer the judge's parser could not read and got the fallback")
    assert some.endswith("(first: '??')")
    total = JudgeStats.from_dict({**JudgeStats(asked=3, unparsable=2, out_of_range=1).as_dict(), "asked": 3.0})
    assert total.warning("judgement", "x").startswith("every judgement had an answer the judge's parser could not "
                                                      "read or found off the template's scale")


@pytest.mark.skipif(not __import__("torch").distributed.is_available(), reason="torch without torch.distributed")
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU-process test: run with CUDA_VISIBLE_DEVICES=")
def test_label_ai_two_processes_sum_the_judge_counts_and_stop_together(tmp_path):
    env = {**os.environ, "ALIGNKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "alignkit.cli", *map(str, label_ai(tmp_path, UNREADABLE))],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    # Every answer unreadable on both processes: no pair. Both stop with the same one-line error (neither
    # waits for the other at a collective), which names the judge's answers, counted over both processes.
    assert done.returncode != 0
    # (torchrun's own launcher then prints its ChildFailedError; the two processes write their lines at
    # the same moment, so they may interleave: count the messages, not the lines.)
    said = done.stdout + done.stderr
    error = ("alignkit: error: label-ai: no pairs to write: the completions of 6 of 6 prompts all scored alike under "
             '{"judge": {"cache": false, "generation": {"max_new_tokens": 4}, "model": {"name": "tiny:llama"}, '
             '"template": "quality"}} (every judgement had an answer the judge\'s parser could not read')
    assert said.count(error) == 2, said[-4000:]


@pytest.mark.parametrize("override, message", [
    ("feedback.judge.fallback=nan", "fallback"),
    ("feedback.judge.template=toxicity", "pairwise"),
    ("feedback.judge.template=toxicity feedback.judge.mode=generate", "needs a pairwise one"),
])
def test_cai_checks_its_feedback_judge_before_the_supervised_phase(tmp_path, capsys, monkeypatch, override, message):
    from alignkit.recipes import cai

    def never(*a, **kw):
        raise AssertionError("sampled before the judge settings were checked")

    monkeypatch.setattr(cai, "load_causal_lm", never, raising=False)
    import alignkit.models as models
    monkeypatch.setattr(models, "load_causal_lm", never)
    code = cli.main(["cai", "--config", str(CONFIGS / "cai-tiny.yaml"), f"run.output_dir={tmp_path}", *override.split()])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("seed", ["-1", "1e30", "2**70"])
def test_a_run_seed_out_of_range_is_a_one_line_error(tmp_path, capsys, seed):
    code = cli.main(["sft", "--config", str(CONFIGS / "sft-tiny.yaml"), f"run.output_dir={tmp_path}", f"run.seed={seed}"])
    err = capsys.readouterr().err
    assert code == 2 and "run.seed" in err and len(err.strip().splitlines()) == 1, err
