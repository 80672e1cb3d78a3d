"""Two-sided alignment: prompt kinds reach rewards and judges, the evaluation reports each
kind on its own, and the demo's checks fail when either side's promise is broken."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alignkit.data.formats import load_preferences, load_prompts
from alignkit.eval import metrics as M
from alignkit.eval.report import render_html, render_summary_table
from alignkit.online import kind_scores, score_rollout
from alignkit.recipes import eval as eval_recipe
from alignkit.recipes.demo import result_checks
from alignkit.rewards import build_reward
from alignkit.rollout import Rollout

RED, HELP = "red_team", "helpful"


def scores(name, toxicity, refusal, helpfulness, texts=None):
    tox = np.array(toxicity, dtype=float)
    p, k = tox.shape
    return M.ModelScores(name=name, toxicity=tox, length=np.full((p, k), 10.0), finished=np.ones((p, k), bool),
                         texts=tuple(texts or [f"{name} answer {i}" for i in range(p * k)]),
                         refusal=np.array(refusal, dtype=float), helpfulness=np.array(helpfulness, dtype=float))


NAN = float("nan")
KINDS = [RED, RED, HELP, HELP]
BASE = scores("start", [[.4, .2], [.6, .4], [0, 0], [.1, .1]], [[1, 0], [0, 0], [0, 0], [0, 1]],
              [[NAN, NAN], [NAN, NAN], [.5, .7], [.2, .4]])
TUNED = scores("ppo", [[.1, .1], [.2, .2], [0, 0], [.1, .1]], [[1, 1], [1, 0], [1, 0], [1, 1]],
               [[NAN, NAN], [NAN, NAN], [.4, .4], [.3, .1]])


def value(metric):
    return metric["value"] if isinstance(metric, dict) else metric


# --------------------------------------------------------------------------- per-kind statistics


def test_each_kind_is_summarised_on_its_own_prompts_against_the_baseline_on_the_same_prompts():
    by_kind = M.summarise_by_kind(TUNED, BASE, KINDS)
    assert set(by_kind) == {RED, HELP}
    red, helpful = by_kind[RED], by_kind[HELP]
    # red team: per-prompt toxicity before (.4+.2)/2 = .3, (.6+.4)/2 = .5 -> mean .4;
    # after .1, .2 -> .15; paired change mean((.1-.3), (.2-.5)) = -.25; relative (.4-.15)/.4 = .625
    assert value(red["toxicity_mean"]) == pytest.approx(0.15)
    assert value(red["toxicity_change_vs_baseline"]) == pytest.approx(-0.25)
    assert value(red["toxicity_relative_improvement"]) == pytest.approx(0.625)
    # refusals on the red-team prompts: after (1+1)/2 = 1, (1+0)/2 = .5 -> .75; before .5, 0 -> .25
    assert value(red["refusal_rate"]) == pytest.approx(0.75)
    assert value(red["refusal_change_vs_baseline"]) == pytest.approx(0.5)
    assert "helpfulness" not in red  # red-team prompts carry no helpfulness score
    # everyday: refusals before 0, .5 -> .25; after .5, 1 -> .75; change +.5
    assert value(helpful["refusal_rate"]) == pytest.approx(0.75)
    assert value(helpful["refusal_change_vs_baseline"]) == pytest.approx(0.5)
    # helpfulness before (.5+.7)/2 = .6, (.2+.4)/2 = .3 -> .45; after .4, .2 -> .3; change mean(-.2, -.1) = -.15
    assert value(helpful["helpfulness"]) == pytest.approx(0.3)
    assert value(helpful["helpfulness_change_vs_baseline"]) == pytest.approx(-0.15)
    assert value(helpful["toxicity_change_vs_baseline"]) == pytest.approx(0.0)
    # distinct-2 reads only the kind's own 4 texts "ppo answer 4" .. "ppo answer 7": 8 bigrams,
    # "ppo answer" 4 times and "answer 4" .. "answer 7" once each -> 5 distinct / 8
    assert value(helpful["distinct_2"]) == pytest.approx(5 / 8)


def test_overall_helpfulness_is_over_the_scored_prompts_only():
    overall = M.summarise(TUNED, BASE)
    assert value(overall["helpfulness"]) == pytest.approx(0.3)  # the two everyday prompts, not NaN or 0
    assert value(overall["refusal_rate"]) == pytest.approx((1 + .5 + .5 + 1) / 4)
    assert value(overall["toxicity_mean"]) == pytest.approx((.1 + .2 + 0 + .1) / 4)


def test_untagged_prompts_form_their_own_group():
    by_kind = M.summarise_by_kind(TUNED, BASE, [RED, RED, None, None])
    assert set(by_kind) == {RED, "untagged"}
    with pytest.raises(ValueError, match="3 kinds for 4 prompts"):
        M.summarise_by_kind(TUNED, BASE, [RED, RED, HELP])


def test_pairwise_rows_split_by_kind():
    def judge(prompt, a, b, kind=None):  # red team: the shorter wins; everyday: the longer
        if len(a) == len(b):
            return "tie"
        return ("A" if len(a) < len(b) else "B") if kind == RED else ("A" if len(a) > len(b) else "B")

    cfg = eval_recipe.Config(pairwise=[eval_recipe.PairwiseConfig("x", "y")], samples_per_prompt=1)
    judges = [M.SwappedJudge(judge, "python:test:judge")]
    messages = [[{"role": "user", "content": str(i)}] for i in range(4)]

    def samples(name, texts):
        return M.ModelSamples(name, 1, tuple(texts), ((1,),) * 4, ((2,),) * 4, (True,) * 4, 1.0, 0)

    got = {"x": samples("x", ["a", "aaa", "aaa", "a"]), "y": samples("y", ["aa", "aa", "aa", "aa"])}
    rows, _ = eval_recipe._compare(cfg, judges, messages, KINDS, got)
    row = rows[0]
    # red team: "a" vs "aa" shorter wins (win); "aaa" vs "aa" loses; everyday: "aaa" longer wins, "a" loses
    assert (row["wins"], row["ties"], row["losses"]) == (2, 0, 2)
    red, helpful = row["by_kind"][RED], row["by_kind"][HELP]
    assert (red["wins"], red["losses"], helpful["wins"], helpful["losses"]) == (1, 1, 1, 1)
    assert red["win_rate"]["value"] == pytest.approx(0.5)
    text = render_summary_table({"models": [], "pairwise": rows})
    assert "x vs y" in text


def test_report_leads_with_the_two_sided_table():
    summary = {"models": [
        {"name": "start", "metrics": M.summarise(BASE, BASE), "by_kind": M.summarise_by_kind(BASE, BASE, KINDS)},
        {"name": "ppo", "metrics": M.summarise(TUNED, BASE), "by_kind": M.summarise_by_kind(TUNED, BASE, KINDS)}]}
    page = render_html(summary)
    assert page.index('id="by-kind-table"') < page.index('id="summary-table"')
    assert 'data-kind="helpful" data-metric="helpfulness_change_vs_baseline"' in page
    text = render_summary_table(summary)
    first = text.splitlines()[0]
    assert first.split()[:2] == ["kind", "metric"]
    assert any(line.startswith("red_team") and "refusal rate" in line for line in text.splitlines())


# --------------------------------------------------------------------------- kinds reach the rewards


def _rollout(texts, prompt_index):
    n = len(texts)
    ones, zeros = torch.ones(n, 2, dtype=torch.long), torch.zeros(n, 1)
    return Rollout(query_responses=ones, attention_mask=ones, position_ids=ones, context_length=1,
                   responses=ones[:, 1:], mask=torch.ones(n, 1, dtype=torch.bool), logprobs=zeros,
                   ref_logprobs=zeros, values=zeros, finished=torch.ones(n, dtype=torch.bool),
                   prompt_index=torch.tensor(prompt_index), texts=tuple(texts), temperature=1.0)


def test_the_gated_reward_gets_each_rollout_rows_prompt_kind():
    # safety: share of the words that are "nice"; helpfulness: length / 10 words; gate by kind only
    gated = build_reward({"gated": {"safety": "rule:token_share:nice", "helpfulness": "rule:length:10",
                                    "threshold": 0.0, "unsafe_kinds": [RED]}, "normalize": "none"})
    prompts = [[{"role": "user", "content": "roast me"}], [{"role": "user", "content": "a recipe"}]]
    texts = ["nice nice", "one two three four five", "nice one", "nice"]
    rollout = _rollout(texts, [0, 1, 0, 1])
    scores, raw = score_rollout(gated, prompts, rollout, None, kinds=[RED, HELP])
    # rows 0 and 2 are red-team (safety: 2/2, 1/2); rows 1 and 3 everyday (length: 5/10, 1/10)
    assert scores.tolist() == pytest.approx([1.0, 0.5, 0.5, 0.1])
    assert kind_scores([RED, HELP], rollout, scores) == pytest.approx({"score/red_team": 0.75, "score/helpful": 0.3})
    # without kinds every row is gated by its score alone: all helpfulness here
    untagged, _ = score_rollout(gated, prompts, rollout, None)
    assert untagged.tolist() == pytest.approx([0.2, 0.5, 0.2, 0.1])


def test_label_ai_tags_pairs_with_the_prompt_kind_and_rm_data_filters_on_it(tmp_path):
    from alignkit.recipes import label_ai
    from alignkit.config import load_config

    src = tmp_path / "completions.jsonl"
    rows = [{"prompt": "roast me", "kind": RED, "completions": ["nice nice", "bad words", "nice bad"]},
            {"prompt": "a recipe", "kind": HELP, "completions": ["one", "one two three", "one two"]},
            {"prompt": "untagged", "completions": ["x", "x y"]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"gated": {"safety": "rule:token_share:nice", "helpfulness": "rule:length:3", "threshold": 0.0,
                      "unsafe_kinds": [RED]}, "normalize": "none"}
    cfg = load_config(label_ai.Config, None, [f"data.path={src}", f"run.output_dir={tmp_path}", "run.name=t"])
    cfg.reward = spec
    out = label_ai.main(cfg)
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    by_kind = {}
    for p in pairs:
        by_kind.setdefault(p.get("kind"), []).append((p["chosen"], p["rejected"]))
    # red team ranked by safety: "nice nice" (1) > "nice bad" (.5) > "bad words" (0)
    assert sorted(by_kind[RED]) == sorted([("nice nice", "nice bad"), ("nice nice", "bad words"),
                                           ("nice bad", "bad words")])
    # everyday ranked by length: "one two three" (1) > "one two" (2/3) > "one" (1/3)
    assert sorted(by_kind[HELP]) == sorted([("one two three", "one two"), ("one two three", "one"), ("one two", "one")])
    assert None in by_kind  # the untagged prompt's pair has no kind
    assert len(load_preferences(str(out / "pairs.jsonl"), kind=RED)) == 3
    assert {p.chosen for p in load_preferences(str(out / "pairs.jsonl"), kind=HELP)} == {"one two three", "one two"}
    assert len(load_preferences(str(out / "pairs.jsonl"))) == len(pairs)
    with pytest.raises(Exception, match="no usable preference records of kind 'nope'"):
        load_preferences(str(out / "pairs.jsonl"), kind="nope")


def test_a_kind_that_is_not_a_string_is_a_located_error(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "kind": 3}) + "\n")
    with pytest.raises(Exception, match=r"p.jsonl:line 1: field .kind."):
        load_prompts(str(bad))


# --------------------------------------------------------------------------- the demo's checks


def _demo_metrics():
    """A run that keeps every promise: red team -60%, everyday unchanged, judge 0.7 / 0.55."""
    def metric(v, low=None, high=None):
        return {"value": v, "low": v if low is None else low, "high": v if high is None else high}

    def side(tox, refusal, distinct, help_=None, change=None, refusal_change=None, help_change=None):
        out = {"toxicity_mean": metric(tox), "refusal_rate": metric(refusal), "distinct_2": metric(distinct)}
        if change is not None:
            out["toxicity_change_vs_baseline"] = metric(*change)
        if refusal_change is not None:
            out["refusal_change_vs_baseline"] = metric(*refusal_change)
        if help_ is not None:
            out["helpfulness"] = metric(help_)
        if help_change is not None:
            out["helpfulness_change_vs_baseline"] = metric(*help_change)
        return out

    start = {"name": "start", "metrics": {"distinct_2": metric(0.6)},
             "by_kind": {RED: side(0.10, 0.05, 0.60), HELP: side(0.02, 0.01, 0.70, help_=0.5)}}
    ppo = {"name": "ppo", "metrics": {"kl_to_reference": metric(2.5), "distinct_2": metric(0.6)},
           "by_kind": {RED: side(0.04, 0.20, 0.58, change=(-0.06, -0.09, -0.03)),
                       HELP: side(0.02, 0.01, 0.68, help_=0.52, refusal_change=(0.0, -0.02, 0.02),
                                  help_change=(0.02, -0.03, 0.07))}}
    pairwise = [{"model_a": "ppo", "model_b": "start", "judge": "j", "by_kind": {
        RED: {"wins": 20, "ties": 16, "losses": 4, "win_rate": metric(0.7)},
        HELP: {"wins": 12, "ties": 16, "losses": 11, "win_rate": metric(0.51)}}}]
    return {"models": [start, ppo], "pairwise": pairwise, "kl_budget": 5.0}


def _failed(metrics):
    return [line for line in result_checks(metrics, "ppo", "start") if line.startswith("[FAIL]")]


def test_the_demo_checks_pass_when_every_promise_is_kept():
    lines = result_checks(_demo_metrics(), "ppo", "start")
    assert len(lines) == 8 and all(line.startswith("[pass]") for line in lines), lines


def _break(path, new):
    m = copy.deepcopy(_demo_metrics())
    node = m
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = new
    return m


PPO_RED = ("models", 1, "by_kind", RED)
PPO_HELP = ("models", 1, "by_kind", HELP)


@pytest.mark.parametrize("path, new, says", [
    # red team only -40%: toxicity down, interval below 0, but not by half
    (PPO_RED + ("toxicity_change_vs_baseline",), {"value": -0.04, "low": -0.06, "high": -0.02}, "red-team toxicity"),
    # -60% but the interval reaches 0
    (PPO_RED + ("toxicity_change_vs_baseline",), {"value": -0.06, "low": -0.1, "high": 0.001}, "red-team toxicity"),
    # the stock-apology collapse: everyday refusals up (upper end +8 points) ...
    (PPO_HELP + ("refusal_change_vs_baseline",), {"value": 0.05, "low": 0.02, "high": 0.08}, "everyday refusal"),
    # ... and everyday answers less helpful (interval wholly below 0)
    (PPO_HELP + ("helpfulness_change_vs_baseline",), {"value": -0.1, "low": -0.15, "high": -0.01},
     "everyday helpfulness"),
    (("models", 1, "metrics", "kl_to_reference"), {"value": 6.0, "low": 5.5, "high": 6.5}, "KL to reference"),
    # one phrasing everywhere: distinct-2 of one kind -20%
    (PPO_RED + ("distinct_2",), {"value": 0.48, "low": 0.48, "high": 0.48}, "red_team distinct-2"),
    (PPO_HELP + ("distinct_2",), {"value": 0.6, "low": 0.6, "high": 0.6}, "helpful distinct-2"),
    (("pairwise", 0, "by_kind", RED, "win_rate"), {"value": 0.58}, "on red_team prompts"),
    (("pairwise", 0, "by_kind", HELP, "win_rate"), {"value": 0.45}, "on helpful prompts"),
])
def test_each_demo_check_fails_alone_when_its_promise_is_broken(path, new, says):
    failed = _failed(_break(path, new))
    assert len(failed) == 1 and says in failed[0], failed


def test_a_missing_side_is_a_failed_check_not_a_silent_pass():
    m = _demo_metrics()
    del m["models"][1]["by_kind"][HELP]
    failed = _failed(m)
    assert any("everyday refusals" in f for f in failed) and any("everyday helpfulness" in f for f in failed)


# --------------------------------------------------------------------------- the loop on tiny models


TWO_SIDED = Path(__file__).resolve().parents[1] / "configs" / "run-two-sided-tiny.yaml"


def test_the_gated_reward_feeds_ppo_and_the_evaluation_splits_by_kind(tmp_path, capsys):
    from alignkit.recipes.pipeline import run_pipeline
    from alignkit.runs import read_metrics

    folders = run_pipeline(TWO_SIDED, rename={"output_dir": str(tmp_path)})
    pairs = [json.loads(line) for line in (folders["label"] / "final" / "pairs.jsonl").read_text().splitlines()]
    assert {p["kind"] for p in pairs} == {RED, HELP}
    # each reward model learned from its own kind's pairs only
    printed = capsys.readouterr().out
    for stage, kind in (("rm-safety", RED), ("rm-help", HELP)):
        n_kind = sum(p["kind"] == kind for p in pairs)
        assert f"alignkit rm: {n_kind} pairs -> {folders[stage]}" in printed

    # PPO's scores are the gated reward of each row's own prompt kind: recompute them
    samples = [json.loads(line) for line in (folders["ppo"] / "samples.jsonl").read_text().splitlines()]
    assert {s["kind"] for s in samples} == {RED, HELP}
    safety = build_reward(f"rm:{folders['rm-safety'] / 'final'}?normalize=true")
    helpful = build_reward(f"rm:{folders['rm-help'] / 'final'}?normalize=true")
    prompts = [[{"role": "user", "content": s["prompt"]}] for s in samples]
    texts = [s["response"] for s in samples]
    p_safe = safety.probability(prompts, texts)
    z_safe, z_help = safety(prompts, texts), helpful(prompts, texts)
    for s, p, zs, zh in zip(samples, p_safe, z_safe, z_help):
        expected = zs if (s["kind"] == RED or p < 0.15) else zh
        assert s["score"] == pytest.approx(expected, abs=1e-4)
    last = read_metrics(folders["ppo"])[-1]
    assert {"score/red_team", "score/helpful"} <= set(last)

    # the evaluation: every metric per kind, helpfulness on everyday prompts only, pairwise by kind
    metrics = json.loads((folders["eval"] / "final" / "metrics.json").read_text())
    ppo_model = next(m for m in metrics["models"] if m["name"] == "ppo")
    assert set(ppo_model["by_kind"]) == {RED, HELP}
    assert "helpfulness" in ppo_model["by_kind"][HELP] and "helpfulness" not in ppo_model["by_kind"][RED]
    assert "refusal_change_vs_baseline" in ppo_model["by_kind"][RED]
    row = metrics["pairwise"][0]
    assert sum(row["by_kind"][k]["n"] for k in (RED, HELP)) == row["n"] == 79
