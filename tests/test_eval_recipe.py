"""`alignkit eval` end to end on two tiny models, and the sampling-based metrics
(KL to the reference, toxicity scoring, position-swapped judging, human win/tie/loss
import) checked against values worked out by hand."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alignkit.cli import main as cli_main
from alignkit.config import ModelConfig, load_config
from alignkit.errors import AlignkitError, DataError
from alignkit.eval import metrics as M
from alignkit.models import load_causal_lm, load_tokenizer
from alignkit.recipes import eval as eval_recipe

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULE = __name__  # python:MODULE:function specs below point at this file's functions


# ---------------------------------------------------------------------------
# judges and rewards used through python: specs


def judge_longer(prompt, response_a, response_b):
    """Prefers the longer response; a consistent judge (survives the position swap)."""
    if len(response_a) == len(response_b):
        return "tie"
    return "A" if len(response_a) > len(response_b) else "B"


def judge_always_first(prompt, response_a, response_b):
    """Pure position bias: whatever is shown first wins."""
    return "A"


def judge_nonsense(prompt, response_a, response_b):
    return "maybe"


def reward_words(prompts, responses):
    """A stand-in reward model: the number of words."""
    return [float(len(r.split())) for r in responses]


def reward_says_yes(prompts, responses):
    return [1.0 if "yes" in r else 0.0 for r in responses]


def reward_logit(prompts, responses):
    """A scorer that does not return probabilities (a raw logit)."""
    return [3.0] * len(responses)


def reward_nan(prompts, responses):
    return [float("nan")] * len(responses)


# ---------------------------------------------------------------------------
# unit: pairwise judging


PROMPTS = [[{"role": "user", "content": f"prompt {i}"}] for i in range(4)]


def test_position_swap_turns_a_position_biased_judge_into_ties():
    # "A" both times means: first A's response won, then B's response won -> disagreement -> tie.
    outcomes = M.judge_swapped(judge_always_first, "first", PROMPTS, ["x"] * 4, ["yy"] * 4)
    assert outcomes == ["tie"] * 4


def test_position_swap_keeps_consistent_verdicts():
    a = ["long answer", "s", "same", "longer one"]
    b = ["short", "much longer", "SAME", "x"]
    # longer wins: A, B, tie (equal length), A
    assert M.judge_swapped(judge_longer, "longer", PROMPTS, a, b) == ["win", "loss", "tie", "win"]


def test_judge_answer_outside_a_b_tie_is_an_error():
    with pytest.raises(AlignkitError, match="judge 'bad' answered 'maybe' on prompt 0"):
        M.judge_swapped(judge_nonsense, "bad", PROMPTS[:1], ["a"], ["b"])


def test_llm_judge_outcomes_mirror_when_the_models_swap_sides(tmp_path):
    # judge:pairwise from alignkit.judges on a tiny random model, logprob mode: the
    # soft label averages both orders, so judging (a, b) and (b, a) must mirror exactly.
    pytest.importorskip("alignkit.judges")
    options = {"model": {"name": "tiny:llama", "seed": 3}, "mode": "logprob", "cache": False}
    judge = M.build_pairwise_judge("judge:pairwise", options)
    a = ["Sure, here is how.", "No.", "I can help with that.", "Stop asking."]
    b = ["I would rather not.", "Yes, gladly: first...", "Maybe.", "Happy to help."]
    forward = judge.compare(PROMPTS, a, b)
    backward = judge.compare(PROMPTS, b, a)
    assert backward == [{"win": "loss", "loss": "win", "tie": "tie"}[o] for o in forward]
    assert set(forward) <= {"win", "tie", "loss"}
    with pytest.raises(AlignkitError, match="needs a pairwise template"):
        M.build_pairwise_judge("judge:quality", {**options, "mode": "generate"})


def test_an_llm_verdict_that_flips_with_the_order_is_a_tie():
    judges = pytest.importorskip("alignkit.judges")

    class Fixed:  # an alignkit.judges pairwise judge with fixed answers
        def compare(self, prompts, responses_a, responses_b):
            return [judges.PairVerdict("A", 0.9, True, True, ()), judges.PairVerdict("B", 0.2, True, True, ()),
                    judges.PairVerdict("A", 0.55, False, True, ()), judges.PairVerdict("tie", 0.5, True, True, ())]

    # Logprob mode averages the orders (p = 0.55 -> "A"), but the two orders disagreed: a tie.
    assert M.LLMJudge(Fixed(), "fixed").compare(PROMPTS, ["a"] * 4, ["b"] * 4) == ["win", "loss", "tie", "tie"]


def test_unknown_judge_spec_is_an_error():
    with pytest.raises(AlignkitError, match="unknown judge"):
        M.build_pairwise_judge("oracle:gpt")
    with pytest.raises(AlignkitError, match="no_such_function"):
        M.build_pairwise_judge(f"python:{MODULE}:no_such_function")


def test_human_summary_is_read_either_way_round_and_both_bad_counts_as_tie(tmp_path):
    path = tmp_path / "winloss_summary.json"
    path.write_text(json.dumps({"model_a": "ppo", "model_b": "sft", "wins": 30, "ties": 50, "losses": 16,
                                "both_bad": 4}))
    assert M.load_human_summary(str(path), "ppo", "sft") == {"wins": 30, "ties": 54, "losses": 16, "both_bad": 4}
    # Asked for sft against ppo: sft's wins are ppo's losses.
    assert M.load_human_summary(str(path), "sft", "ppo") == {"wins": 16, "ties": 54, "losses": 30, "both_bad": 4}
    with pytest.raises(DataError, match="compares 'ppo' with 'sft', not 'dpo' with 'sft'"):
        M.load_human_summary(str(path), "dpo", "sft")


def test_human_summary_with_a_bad_field_names_file_and_field(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"model_a": "a", "model_b": "b", "wins": 3, "ties": -1, "losses": 0}))
    with pytest.raises(DataError, match=r"s\.json: field 'ties': must be a whole number >= 0"):
        M.load_human_summary(str(path), "a", "b")
    path.write_text(json.dumps({"model_a": "a", "model_b": "b", "wins": 3, "losses": 0}))
    with pytest.raises(DataError, match="field 'ties': missing field"):
        M.load_human_summary(str(path), "a", "b")


# ---------------------------------------------------------------------------
# unit: toxicity scorer and summaries


def test_toxicity_is_one_minus_the_profanity_reward():
    scorer = M.ToxicityScorer("profanity")
    texts = ["Have a lovely day.", "Shut up, you stupid idiot."]
    toxicity = scorer(PROMPTS[:2], texts)
    reward = scorer.fn(PROMPTS[:2], texts)
    np.testing.assert_allclose(toxicity, 1.0 - reward)
    assert toxicity[0] < 0.5 < toxicity[1]


def test_a_scorer_that_is_not_a_probability_or_fails_is_an_error_not_a_zero():
    with pytest.raises(AlignkitError, match="must be a probability in"):
        M.ToxicityScorer(f"python:{MODULE}:reward_logit", invert=False)(PROMPTS[:2], ["a", "b"])
    with pytest.raises(AlignkitError, match="non-finite"):
        M.ToxicityScorer(f"python:{MODULE}:reward_nan")(PROMPTS[:2], ["a", "b"])


def test_classifier_toxicity_either_label_gives_the_same_probability(tmp_path, tiny_tokenizer):
    # A two-label text classifier saved to a folder, as a hub toxicity model would be:
    # P(toxic) read directly equals 1 - P(ok) read with invert.
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=2, id2label={0: "ok", 1: "toxic"},
                         label2id={"ok": 0, "toxic": 1}, pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "clf")
    tiny_tokenizer.save_pretrained(tmp_path / "clf")
    texts = ["you are kind", "go away now", "thanks a lot"]
    toxic = M.ToxicityScorer(f"classifier:{tmp_path / 'clf'}:toxic:prob", invert=False)(PROMPTS[:3], texts)
    not_ok = M.ToxicityScorer(f"classifier:{tmp_path / 'clf'}:ok:prob", invert=True)(PROMPTS[:3], texts)
    np.testing.assert_allclose(toxic, not_ok, atol=1e-6)
    assert np.all((toxic > 0) & (toxic < 1)) and np.ptp(toxic) > 0
    # The raw logit is not a probability: an error that says what to use.
    with pytest.raises(AlignkitError, match=r"classifier:MODEL:LABEL:prob"):
        M.ToxicityScorer(f"classifier:{tmp_path / 'clf'}:toxic", invert=False)(PROMPTS[:3], texts * 3)


def test_summary_against_a_baseline_by_hand():
    # 2 prompts x k=2. Baseline toxicity [[0.2, 0.6], [0.0, 0.2]]: mean 0.25, per-prompt max [0.6, 0.2].
    base = M.ModelScores("base", np.array([[0.2, 0.6], [0.0, 0.2]]), np.full((2, 2), 4.0),
                         np.ones((2, 2), bool), ("a b", "a c", "a b", "d"), reward=np.array([[0.0, 2.0], [1.0, 1.0]]))
    # After: [[0.1, 0.1], [0.0, 0.0]]: mean 0.05 -> relative improvement (0.25 - 0.05) / 0.25 = 0.8.
    after = M.ModelScores("after", np.array([[0.1, 0.1], [0.0, 0.0]]), np.array([[2.0, 4.0], [6.0, 8.0]]),
                          np.array([[True, False], [True, True]]), ("x", "x", "x", "x"),
                          reward=np.array([[2.0, 2.0], [3.0, 3.0]]))
    m = M.summarise(after, base)
    assert m["toxicity_mean"]["value"] == pytest.approx(0.05)
    assert m["toxicity_relative_improvement"] == pytest.approx(0.8)
    assert m["expected_max_toxicity"]["value"] == pytest.approx(0.05)  # max per prompt [0.1, 0.0]
    assert m["toxicity_probability"]["value"] == 0.0
    # Per-prompt means before [0.4, 0.1], after [0.1, 0.0]: differences [-0.3, -0.1], mean -0.2.
    assert m["toxicity_change_vs_baseline"]["value"] == pytest.approx(-0.2)
    # Baseline reward: mean 1, population std 1/sqrt(2); after = [[2, 2], [3, 3]] -> z mean (2.5 - 1) * sqrt(2).
    assert m["reward_score"]["value"] == pytest.approx(2.5)
    assert m["reward_score_normalised"]["value"] == pytest.approx(1.5 * np.sqrt(2))
    assert m["mean_length"]["value"] == pytest.approx(5.0)
    assert m["finished_share"] == pytest.approx(0.75)
    assert m["distinct_1"] == pytest.approx(0.25)  # {x} / 4 words
    mb = M.summarise(base, base)
    assert "toxicity_relative_improvement" not in mb and "toxicity_change_vs_baseline" not in mb
    assert mb["toxicity_probability"]["value"] == 0.5  # prompt 0 has a sample at 0.6 >= 0.5
    assert mb["reward_score_normalised"]["value"] == pytest.approx(0.0)


def test_reward_model_accuracy_counts_ties_as_wrong():
    from alignkit.data.formats import PreferencePair
    from alignkit.rewards import build_reward

    pairs = [PreferencePair(PROMPTS[0], "yes please", "no"),  # 1 > 0: right
             PreferencePair(PROMPTS[0], "no", "yes"),  # 0 < 1: wrong
             PreferencePair(PROMPTS[0], "yes", "yes indeed")]  # 1 = 1: tie, wrong
    acc = M.reward_model_accuracy(build_reward(f"python:{MODULE}:reward_says_yes"), pairs)
    assert acc["value"] == pytest.approx(1 / 3) and acc["n"] == 3
    assert acc["low"] < 1 / 3 < acc["high"]


# ---------------------------------------------------------------------------
# unit: KL to the reference on sampled responses


@pytest.fixture(scope="module")
def tiny_models():
    tok = load_tokenizer("tiny:llama")
    policy = load_causal_lm(ModelConfig(name="tiny:llama", seed=1), trainable=False, tokenizer=tok)
    reference = load_causal_lm(ModelConfig(name="tiny:llama", seed=0), trainable=False, tokenizer=tok)
    return tok, policy, reference


def _samples(tok, temperature=1.0):
    # Two hand-made samples of different lengths, so the batch has padding.
    prompt_a, prompt_b = tok("hello there")["input_ids"], tok("hi")["input_ids"]
    response_a = tok(" the cat")["input_ids"] + [tok.eos_token_id]
    response_b = tok(" a dog ran far away")["input_ids"]
    return M.ModelSamples("p", 1, ("the cat", "a dog ran far away"), (tuple(prompt_a), tuple(prompt_b)),
                          (tuple(response_a), tuple(response_b)), (True, False), temperature, tok.eos_token_id)


def _token_logprobs(model, prompt, response, temperature) -> list[float]:
    """Each response token's log-probability, written out one by one, without batching or padding."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double() / temperature, -1)
    return [float(logp[len(prompt) + t - 1, tok_id]) for t, tok_id in enumerate(response)]


def _logprob_sum(model, prompt, response, temperature):
    return sum(_token_logprobs(model, prompt, response, temperature))


def test_kl_is_zero_against_itself_and_equals_the_logprob_difference(tiny_models):
    tok, policy, reference = tiny_models
    samples = _samples(tok, temperature=0.7)
    np.testing.assert_allclose(M.response_kl(policy, policy, samples, tok.pad_token_id), 0.0, atol=1e-6)
    kl = M.response_kl(policy, reference, samples, tok.pad_token_id, batch_size=2)
    expected = [_logprob_sum(policy, p, r, 0.7) - _logprob_sum(reference, p, r, 0.7)
                for p, r in zip(samples.prompt_ids, samples.response_ids)]
    np.testing.assert_allclose(kl, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(kl, 0.0)  # different weights: a real difference was measured
    # Batched with padding or one at a time: the same numbers.
    np.testing.assert_allclose(M.response_kl(policy, reference, samples, tok.pad_token_id, batch_size=1), kl,
                               rtol=1e-4, atol=1e-5)


def test_kl_uses_the_log_probs_the_sampler_recorded(tiny_models):
    tok, policy, reference = tiny_models
    plain = _samples(tok, temperature=0.7)
    recorded = tuple(tuple(_token_logprobs(policy, p, r, 0.7)) for p, r in zip(plain.prompt_ids, plain.response_ids))
    with_logprobs = dataclasses.replace(plain, logprobs=recorded)
    kl = M.response_kl(policy, reference, plain, tok.pad_token_id, batch_size=2)
    np.testing.assert_allclose(M.response_kl(policy, reference, with_logprobs, tok.pad_token_id, batch_size=2), kl,
                               rtol=1e-4, atol=1e-5)
    # they are read, not recomputed: 0.1 nats more per token is 0.1 x length more per sample
    shifted = dataclasses.replace(plain, logprobs=tuple(tuple(x + 0.1 for x in lp) for lp in recorded))
    lengths = np.array([len(r) for r in plain.response_ids])
    np.testing.assert_allclose(M.response_kl(policy, reference, shifted, tok.pad_token_id), kl + 0.1 * lengths,
                               rtol=1e-4, atol=1e-5)


def test_lengths_do_not_count_the_closing_eos(tiny_models):
    tok = tiny_models[0]
    samples = _samples(tok)
    assert samples.lengths().tolist() == [len(samples.response_ids[0]) - 1, len(samples.response_ids[1])]


# ---------------------------------------------------------------------------
# config


def test_shipped_eval_configs_load():
    for path in sorted((REPO_ROOT / "configs").glob("eval*.yaml")):
        cfg = load_config(eval_recipe.Config, path)
        assert len(cfg.models) >= 2, path


@pytest.mark.parametrize(("overrides", "message"), [
    (["baseline=nobody"], "'baseline' is 'nobody', not one of the models"),
    (["pairwise=[{model_a: start, model_b: ghost, judge: 'python:m:f'}]"], "'pairwise[0].model_b' is 'ghost'"),
    (["pairwise=[{model_a: start, model_b: tuned}]"], "'pairwise[0].judge' is empty"),
    (["generation.do_sample=false"], "samples_per_prompt > 1 with generation.do_sample=false"),
])
def test_config_mistakes_fail_before_sampling(tmp_path, capsys, overrides, message):
    code = cli_main(["eval", "--config", str(REPO_ROOT / "configs" / "eval-tiny.yaml"),
                     f"run.output_dir={tmp_path}", *overrides])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "eval-tiny" / "eval" / "final").exists()


# ---------------------------------------------------------------------------
# end to end through the CLI


def test_eval_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "fake-ppo"  # a training run folder: metrics.jsonl gives the curves
    run_dir.mkdir()
    run_dir.joinpath("metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "score/mean": 0.1 * s, "kl": 0.01 * s}) + "\n" for s in range(5)))
    human = tmp_path / "winloss_summary.json"
    human.write_text(json.dumps({"model_a": "start", "model_b": "tuned", "wins": 3, "ties": 4, "losses": 1,
                                 "both_bad": 2}))
    models = (f"models=[{{name: start, path: 'tiny:llama', seed: 0}}, "
              f"{{name: tuned, path: 'tiny:llama', seed: 1, run_dir: '{run_dir}', temperature: 0.8}}]")
    pairwise = (f"pairwise=[{{model_a: tuned, model_b: start}}, "
                f"{{model_a: tuned, model_b: start, judge: 'python:{MODULE}:judge_always_first'}}, "
                f"{{model_a: tuned, model_b: start, judge: 'human:{human}'}}]")
    pref = tmp_path / "pairs.jsonl"
    pref.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "q", "chosen": "one two three", "rejected": "one"},
        {"prompt": "q", "chosen": "one", "rejected": "one two"},
    ]))
    code = cli_main(["eval", "--config", str(REPO_ROOT / "configs" / "eval-tiny.yaml"),
                     f"run.output_dir={tmp_path}", models, pairwise, f"judge=python:{MODULE}:judge_longer",
                     f"reward_model=python:{MODULE}:reward_words", f"preference_data.path={pref}",
                     "prompts.limit=4"])
    out = capsys.readouterr().out
    assert code == 0
    final = tmp_path / "eval-tiny" / "eval" / "final"
    report = final / "report.html"
    # The last lines: the summary table, then the report path.
    assert out.rstrip().splitlines()[-1] == f"report: {report}"
    assert "toxicity mean" in out and "tuned vs start (human:" in out

    metrics = json.loads((final / "metrics.json").read_text())
    by_name = {m["name"]: m for m in metrics["models"]}
    assert list(by_name) == ["start", "tuned"]
    assert by_name["start"]["n_toxicity_scores"] == 4 * 2  # 4 prompts x k = 2
    start, tuned = by_name["start"]["metrics"], by_name["tuned"]["metrics"]
    assert start["kl_to_reference"]["value"] == 0.0  # the reference against itself
    assert tuned["kl_to_reference"]["value"] != 0.0
    assert "toxicity_change_vs_baseline" in tuned and "toxicity_change_vs_baseline" not in start
    assert start["reward_score_normalised"]["value"] == pytest.approx(0.0, abs=1e-9)
    tox = tuned["toxicity_mean"]
    assert 0.0 <= tox["low"] <= tox["value"] <= tox["high"] <= 1.0

    # Every sample is kept, with the same numbers the summary was computed from.
    rows = [json.loads(line) for line in (final / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4 * 2
    tuned_rows = [r for r in rows if r["model"] == "tuned"]
    assert np.mean([r["toxicity"] for r in tuned_rows]) == pytest.approx(tox["value"])
    assert np.mean([r["reward"] for r in tuned_rows]) == pytest.approx(tuned["reward_score"]["value"])
    assert np.mean([r["reward"] for r in tuned_rows]) == pytest.approx(
        np.mean([len(r["response"].split()) for r in tuned_rows]))
    assert np.mean([r["kl"] for r in tuned_rows]) == pytest.approx(tuned["kl_to_reference"]["value"])

    # Pairwise: the length judge on the first samples, recomputed here; the biased judge ties out;
    # the human import with both_bad counted as ties.
    first = {m: [r["response"] for r in rows if r["model"] == m and r["sample"] == 0] for m in ("tuned", "start")}
    wins = sum(len(a) > len(b) for a, b in zip(first["tuned"], first["start"]))
    losses = sum(len(a) < len(b) for a, b in zip(first["tuned"], first["start"]))
    longer, biased, human_row = metrics["pairwise"]
    assert (longer["wins"], longer["losses"], longer["ties"]) == (wins, losses, 4 - wins - losses)
    assert (biased["wins"], biased["ties"], biased["losses"]) == (0, 4, 0)
    assert (human_row["wins"], human_row["ties"], human_row["losses"]) == (1, 6, 3)  # turned round, 4 + 2 ties
    assert human_row["win_rate"]["value"] == pytest.approx((1 + 6 / 2) / 10)

    # Reward-model accuracy on the two held-out pairs: words(chosen) > words(rejected) once.
    assert metrics["reward_model_accuracy"]["value"] == pytest.approx(0.5)
    assert metrics["curves"]["tuned"]["n_rows"] == 5
    html = report.read_text()
    assert 'id="plot-curves"' in html and 'id="plot-toxicity"' in html and 'id="plot-win-tie-loss"' in html
    assert "T=0.8" in html  # the per-model temperature is on record


# ---------------------------------------------------------------------------
# inference-time best-of-N as a model in the comparison


def test_best_of_keeps_the_highest_reward_of_each_group_of_n():
    from alignkit.rollout import Generation

    texts = ["a", "a b c", "a b",   # prompt 0, sample 0: best is "a b c" (3 words)
             "x y", "x", "x y",     # prompt 0, sample 1: tie between 0 and 2 -> the first, "x y"
             "p q r s", "p", "p q"]  # prompt 1, sample 0
    gens = [Generation(prompt_index=i // 6, sample_index=i % 6, prompt_ids=(1,), response_ids=(2,), text=t,
                       finished=True) for i, t in enumerate(texts)]
    kept = eval_recipe._best_of(gens, PROMPTS[:2], 3, reward_words)
    assert [g.text for g in kept] == ["a b c", "x y", "p q r s"]
    assert kept[1] is gens[3]


def test_best_of_n_kl_closed_form():
    # log n - (n - 1) / n: n = 1 is the model itself; n = 4: 1.386294 - 0.75 = 0.636294
    assert eval_recipe.best_of_n_kl(1) == 0.0
    assert eval_recipe.best_of_n_kl(4) == pytest.approx(1.3862944 - 0.75, abs=1e-6)


def test_best_of_n_without_a_reward_is_a_config_error(tmp_path, capsys):
    models = "models=[{name: start, path: 'tiny:llama'}, {name: bon, path: 'tiny:llama', best_of: 4}]"
    code = cli_main(["eval", "--config", str(REPO_ROOT / "configs" / "eval-tiny.yaml"),
                     f"run.output_dir={tmp_path}", models])
    assert code == 2
    assert "'models[1].best_of' is 4 but there is no reward" in capsys.readouterr().err


def test_eval_best_of_n_of_the_reference(tmp_path, capsys):
    models = ("models=[{name: start, path: 'tiny:llama', seed: 0}, "
              f"{{name: bon, path: 'tiny:llama', seed: 0, best_of: 4, best_of_reward: 'python:{MODULE}:reward_words'}}]")
    code = cli_main(["eval", "--config", str(REPO_ROOT / "configs" / "eval-tiny.yaml"),
                     f"run.output_dir={tmp_path}", models, f"reward_model=python:{MODULE}:reward_says_yes",
                     "prompts.limit=4"])
    assert code == 0
    final = tmp_path / "eval-tiny" / "eval" / "final"
    rows = [json.loads(line) for line in (final / "samples.jsonl").read_text().splitlines()]
    bon = [r for r in rows if r["model"] == "bon"]
    assert len(bon) == 4 * 2  # k samples per prompt, each the best of 4 drawn
    # The picker is best_of_reward (words), not reward_model: best of 4 has at least as many words
    # on average as single samples (equal only if every draw had the same count).
    start_words = np.mean([len(r["response"].split()) for r in rows if r["model"] == "start"])
    assert np.mean([len(r["response"].split()) for r in bon]) >= start_words
    # Same weights as the reference: the closed-form KL of best-of-4, not 0.
    metrics = json.loads((final / "metrics.json").read_text())
    kl = {m["name"]: m["metrics"]["kl_to_reference"]["value"] for m in metrics["models"]}
    assert kl == {"start": 0.0, "bon": pytest.approx(np.log(4) - 0.75)}
    assert "best of 4 by python:" in (final / "report.html").read_text()
