"""The whole loop end to end on tiny models, through the CLI; reruns skip finished stages."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignkit.errors import ConfigError
from alignkit.recipes.pipeline import MARKER, load_pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "run-tiny.yaml"


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "alignkit", "run", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_then_rerun_skips(tmp_path):
    out = run(TINY, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    base = Path("runs") / "tiny-pipeline"  # relative to the working folder, as the YAML says
    assert (tmp_path / base).is_dir()
    for stage in ("label-ai", "rm", "ppo", "dpo", "eval"):
        assert (tmp_path / base / stage / MARKER).exists(), stage
    # the stages handed their outputs on: rm trained on label-ai's pairs, PPO used that RM
    rm_cfg = yaml.safe_load((tmp_path / base / "rm" / "config.yaml").read_text())
    assert rm_cfg["data"]["path"] == str(base / "label-ai" / "final" / "pairs.jsonl")
    ppo_cfg = yaml.safe_load((tmp_path / base / "ppo" / "config.yaml").read_text())
    assert ppo_cfg["reward"]["spec"] == f"rm:{base / 'rm' / 'final'}"
    metrics = json.loads((tmp_path / base / "eval" / "final" / "metrics.json").read_text())
    assert "ppo" in json.dumps(metrics) and "dpo" in json.dumps(metrics)
    assert (tmp_path / base / "eval" / "final" / "report.html").exists()

    # a rerun with nothing changed skips every stage
    again = run(TINY, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped") == 5

    # a changed stage config reruns that stage and the ones after it, not those before
    changed = run(TINY, "stages.dpo.train.learning_rate=0.002", cwd=tmp_path)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert changed.stdout.count("skipped") == 3  # label, rm, ppo
    assert "dpo (dpo): running" in changed.stdout and "eval (eval): running" in changed.stdout


def test_pipeline_errors(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\nstages:\n  - {name: a, stage: sft}\n  - {name: a, stage: rm}\n")
    with pytest.raises(ConfigError, match="'stages\\[1\\].name': 'a' is used twice"):
        load_pipeline(bad)
    bad.write_text("name: x\nstages:\n  - {name: a, stage: nope}\n")
    with pytest.raises(ConfigError, match="'nope' is not a pipeline stage"):
        load_pipeline(bad)
    bad.write_text("name: x\nstagse: []\n")
    with pytest.raises(ConfigError, match="unknown config key 'stagse'"):
        load_pipeline(bad)


def test_references_to_later_stages_are_errors(tmp_path):
    from alignkit.recipes.pipeline import run_pipeline

    p = tmp_path / "p.yaml"
    p.write_text("name: x\noutput_dir: " + str(tmp_path) + "\nstages:\n"
                 "  - {name: a, stage: sft, config: {data: {path: '${b.final}/x.jsonl'}}}\n"
                 "  - {name: b, stage: rm}\n")
    with pytest.raises(ConfigError, match="names no earlier stage|'\\$\\{b\\}'"):
        run_pipeline(p)


@pytest.mark.parametrize("quick", [False, True], ids=["demo", "demo-quick"])
def test_builtin_demo_pipeline_stage_configs_are_valid(tmp_path, quick):
    """`alignkit demo` would fail minutes in on a bad key; check every stage's config up front,
    with --quick's overrides too, and the promises the demo checks (KL budget, PPO vs start)."""
    from alignkit.recipes.demo import QUICK, demo_pipeline
    from alignkit.recipes.pipeline import stage_config

    pipe = load_pipeline(demo_pipeline(), QUICK if quick else [])
    folders, configs = {}, {}
    for spec in pipe.stages:
        module, cfg = stage_config(pipe, spec, folders, "demo")
        if hasattr(module, "check_config"):
            module.check_config(cfg)
        folders[spec.name] = tmp_path / spec.name
        configs[spec.name] = cfg
    ppo, ev = configs["ppo"], configs["eval"]
    # the two learned RMs, gated by prompt kind, not the classifier or the judge that labelled
    gated = ppo.reward.spec["gated"]
    assert (gated["safety"], gated["helpfulness"]) == (f"rm:{tmp_path / 'rm-safety' / 'final'}",
                                                       f"rm:{tmp_path / 'rm-help' / 'final'}")
    assert gated["unsafe_kinds"] == ["red_team"] and ppo.data.prompts.kind is None  # PPO on both kinds
    assert (configs["rm-safety"].data.kind, configs["rm-help"].data.kind) == ("red_team", "helpful")
    # scored by what labelled the red-team answers, not what PPO optimised
    assert ev.toxicity.scorer == configs["label"].reward["gated"]["safety"]
    assert ev.kl_budget and {m.name for m in ev.models} >= {"start", "ppo", "dpo"}
    assert any(m.best_of > 1 for m in ev.models) != quick  # the inference-time baseline (not in --quick)
    assert ev.samples_per_prompt >= 2  # paired intervals need more than one sample per prompt
    assert ("ppo", "start") in {(p.model_a, p.model_b) for p in ev.pairwise}
    assert (ppo.ppo.steps <= 6) == quick  # the --quick overrides reach the stages


ROUNDS = ROOT / "configs" / "run-rounds-tiny.yaml"


@pytest.mark.slow
def test_two_rounds_each_labelling_the_last_policy_then_a_rerun_skips(tmp_path):
    out = run(ROUNDS, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    base = tmp_path / "runs" / "tiny-rounds"
    r1, r2 = base / "round-1", base / "round-2"
    # round 2 labels the answers of the policy round 1 ended with (its provenance says so)...
    rankings = [json.loads(line) for line in (r2 / "label-ai" / "final" / "rankings.jsonl").read_text().splitlines()]
    assert {r["provenance"]["model"] for r in rankings} == {str(Path("runs/tiny-rounds/round-1/ppo/final"))}
    # ...its reward model learns from both rounds' labels...
    n1 = len((r1 / "label-ai" / "final" / "pairs.jsonl").read_text().splitlines())
    n2 = len((r2 / "label-ai" / "final" / "pairs.jsonl").read_text().splitlines())
    rm_cfg = yaml.safe_load((r2 / "rm" / "config.yaml").read_text())
    merged = tmp_path / rm_cfg["data"]["path"]
    assert len(merged.read_text().splitlines()) == n1 + n2 > n2 > 0
    # ...and its PPO continues from round 1's policy, against round 2's reward model
    ppo_cfg = yaml.safe_load((r2 / "ppo" / "config.yaml").read_text())
    assert ppo_cfg["model"]["name"] == str(Path("runs/tiny-rounds/round-1/ppo/final"))
    assert ppo_cfg["reward"]["spec"] == f"rm:{Path('runs/tiny-rounds/round-2/rm/final')}"
    # the evaluation has a row per round and a curve over rounds
    metrics = json.loads((base / "eval" / "final" / "metrics.json").read_text())
    assert [(r["round"], r["model"]) for r in metrics["rounds"]] == [(0, "start"), (1, "round-1"), (2, "round-2")]
    report = (base / "eval" / "final" / "report.html").read_text()
    assert 'id="rounds-table"' in report and 'id="plot-rounds"' in report

    again = run(ROUNDS, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("skipped") == 7


@pytest.mark.slow
def test_human_labels_stand_in_for_a_rounds_ai_labels(tmp_path):
    human = tmp_path / "preferences.jsonl"  # what `alignkit label export` writes
    human.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"A kind answer {i}.",
                                         "rejected": f"A rude answer {i}!"}) + "\n" for i in range(5)))
    pipe = yaml.safe_load(ROUNDS.read_text())
    pipe["rounds"]["labels"] = {2: str(human)}
    pipe["after"] = []
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pipe))
    out = run(tmp_path / "p.yaml", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "labels from" in out.stdout and out.stdout.count(": running (") == 5  # round 2 label-ai did not run
    r2 = tmp_path / "runs" / "tiny-rounds" / "round-2"
    pairs = [json.loads(line) for line in (r2 / "label-ai" / "final" / "pairs.jsonl").read_text().splitlines()]
    assert [p["chosen"] for p in pairs] == [f"A kind answer {i}." for i in range(5)]
    rm_cfg = yaml.safe_load((r2 / "rm" / "config.yaml").read_text())
    assert "A rude answer 4!" in (tmp_path / rm_cfg["data"]["path"]).read_text()  # round 2's RM saw them
    assert run(tmp_path / "p.yaml", cwd=tmp_path).stdout.count("skipped") == 6


def test_rounds_errors(tmp_path):
    bad = tmp_path / "p.yaml"
    base = "name: x\nrounds:\n  count: 2\n  start: tiny:llama\n  stages:\n    - {name: a, stage: sft}\n"
    bad.write_text(base + "  policy: nope\n")
    with pytest.raises(ConfigError, match="'rounds.policy' must name a stage of the rounds"):
        load_pipeline(bad)
    bad.write_text(base + "  policy: a\n  labels: {3: x.jsonl}\n")
    with pytest.raises(ConfigError, match="'rounds.labels': 3 is not a round"):
        load_pipeline(bad)
    bad.write_text("name: x\nstages:\n  - {name: a, stage: sft, config: {model: {name: '${policy}'}}}\n")
    from alignkit.recipes.pipeline import run_pipeline

    with pytest.raises(ConfigError, match="only defined inside rounds"):
        run_pipeline(bad)


def test_two_stages_of_one_kind_get_folders_of_their_own(tmp_path):
    from alignkit.recipes.pipeline import folder_of, plan, stage_config

    p = tmp_path / "p.yaml"
    p.write_text("name: x\noutput_dir: out\nstages:\n  - {name: grpo, stage: rl}\n  - {name: rloo, stage: rl}\n"
                 "  - {name: sft, stage: sft}\n")
    pipe = load_pipeline(p)
    folders = [folder_of(pipe, step) for step in plan(pipe)]
    assert folders == [Path("out/x/grpo/rl"), Path("out/x/rloo/rl"), Path("out/x/sft")]
    _, cfg = stage_config(pipe, pipe.stages[1], {}, "p.yaml", plan(pipe)[1])
    assert Path(cfg.run.output_dir) / cfg.run.name / "rl" == folders[1]  # where the recipe writes
