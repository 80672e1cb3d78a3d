"""Critic-free online RL: hand-computed advantages and losses, then each optimiser on a tiny model."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from alignkit import cli
from alignkit.advantages import group_advantages, leave_one_out_advantages, uniform_groups
from alignkit.config import load_config
from alignkit.losses import aggregation_weights, clipped_policy_loss, kl_loss
from alignkit.recipes import rl
from alignkit.rollout import Rollout
from alignkit.runs import read_metrics
from alignkit.training import Engine

TINY = Path(__file__).resolve().parents[1] / "configs" / "rl-grpo-tiny.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")

# Two groups of G = 3 answers, prompt-major: group 1 scores 1, 2, 6; group 2 scores 0, 0, 3.
SCORES = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])


# --------------------------------------------------------------------------- advantages


def test_grpo_advantages_by_hand():
    # group 1: mean 3, deviations -2, -1, 3; sample std sqrt((4 + 1 + 9) / 2) = sqrt(7) = 2.6458
    # group 2: mean 1, deviations -1, -1, 2; sample std sqrt((1 + 1 + 4) / 2) = sqrt(3) = 1.7321
    eps = 1e-4
    expected = torch.tensor([-2 / (math.sqrt(7) + eps), -1 / (math.sqrt(7) + eps), 3 / (math.sqrt(7) + eps),
                             -1 / (math.sqrt(3) + eps), -1 / (math.sqrt(3) + eps), 2 / (math.sqrt(3) + eps)])
    torch.testing.assert_close(group_advantages(SCORES, 3, scale=True, eps=eps), expected)
    # Dr. GRPO: the deviations alone
    torch.testing.assert_close(group_advantages(SCORES, 3, scale=False), torch.tensor([-2.0, -1, 3, -1, -1, 2]))


def test_rloo_advantages_by_hand():
    # each score minus the mean of the other two of its group:
    # 1 - (2 + 6)/2 = -3, 2 - (1 + 6)/2 = -1.5, 6 - (1 + 2)/2 = 4.5; 0 - 1.5 = -1.5 (twice), 3 - 0 = 3
    torch.testing.assert_close(leave_one_out_advantages(SCORES, 3), torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    # = G/(G-1) x the GRPO deviations
    torch.testing.assert_close(leave_one_out_advantages(SCORES, 3), 1.5 * group_advantages(SCORES, 3, scale=False))


def test_uniform_groups_are_found_for_filtering():
    assert uniform_groups(torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 0.0]), 3).tolist() == [True, False]
    assert uniform_groups(SCORES, 3).tolist() == [False, False]


def _rollout(logprobs, ref_logprobs, mask, scores_len=None) -> Rollout:
    n, t = mask.shape
    return Rollout(query_responses=torch.zeros(n, t + 1, dtype=torch.long), attention_mask=torch.ones(n, t + 1),
                   position_ids=torch.zeros(n, t + 1), context_length=1, responses=torch.zeros(n, t, dtype=torch.long),
                   mask=mask, logprobs=logprobs, ref_logprobs=ref_logprobs, values=torch.zeros(n, t),
                   finished=torch.ones(n, dtype=torch.bool), prompt_index=torch.arange(n), texts=("a",) * n,
                   temperature=1.0)


def test_reinforce_pp_advantages_by_hand():
    # Row 1 (2 tokens): log-probs [-1, -2], reference [-1.5, -1] -> k1 [0.5, -1]; beta 0.5 -> token
    # rewards [-0.25, 0.5], plus its score 1 at the last token: [-0.25, 1.5]; returns (gamma 1) [1.25, 1.5].
    # Row 2 (3 tokens): policy == reference, score 2 -> rewards [0, 0, 2], returns [2, 2, 2].
    # Whitened over the 5 tokens: mean 1.75; deviations -0.5, -0.25, 0.25, 0.25, 0.25; unbiased
    # variance (0.25 + 0.0625 + 3 x 0.0625) / 4 = 0.125, std 0.35355.
    mask = torch.tensor([[True, True, False], [True, True, True]])
    ro = _rollout(torch.tensor([[-1.0, -2.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([[-1.5, -1.0, 0.0], [0.0, 0.0, 0.0]]),
                  mask)
    cfg = load_config(rl.Config, TINY, ["rl.algorithm=reinforce_pp", "rl.kl_coef=0.5", "rl.samples_per_prompt=2"])
    adv, _ = rl.rollout_advantages(cfg, ro, torch.tensor([1.0, 2.0]))
    s = math.sqrt(0.125)
    expected = torch.tensor([[-0.5 / s, -0.25 / s, 0.0], [0.25 / s, 0.25 / s, 0.25 / s]])
    torch.testing.assert_close(adv, expected, atol=1e-4, rtol=0)


def test_grpo_with_kl_in_the_reward_subtracts_beta_times_the_sequence_kl():
    # sequence KL (k1 sums): row 0: 0.5 + (-1) = -0.5, row 1: 0; beta 1 -> rewards 1 + 0.5 = 1.5 and 2
    mask = torch.tensor([[True, True, False], [True, True, True]])
    ro = _rollout(torch.tensor([[-1.0, -2.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([[-1.5, -1.0, 0.0], [0.0, 0.0, 0.0]]),
                  mask)
    cfg = load_config(rl.Config, TINY, ["rl.kl_coef=1.0", "rl.kl_in=reward", "rl.samples_per_prompt=2",
                                        "rl.scale_rewards=false"])
    adv, _ = rl.rollout_advantages(cfg, ro, torch.tensor([1.0, 2.0]))
    # group of two: mean 1.75 -> -0.25 and +0.25, on every valid token of each row
    torch.testing.assert_close(adv, torch.tensor([[-0.25, -0.25, 0.0], [0.25, 0.25, 0.25]]))


# --------------------------------------------------------------------------- losses


def _per_token_loss_batch():
    # Per-token losses L = [[4, -, -, -], [1, 2, 3, -]] (ratio 1, so the surrogate is -A = L).
    mask = torch.tensor([[True, False, False, False], [True, True, True, False]])
    loss_values = torch.tensor([[4.0, 0, 0, 0], [1.0, 2, 3, 0]])
    logprobs = torch.zeros(2, 4, requires_grad=True)
    return logprobs, mask, -loss_values


@pytest.mark.parametrize("aggregation, expected", [
    ("token", (4 + 1 + 2 + 3) / 4),          # every token of the batch alike: 10 / 4 = 2.5
    ("sequence", (4 / 1 + (1 + 2 + 3) / 3) / 2),  # each row's token mean, then the rows': (4 + 2) / 2 = 3.0
    ("constant", (4 + 1 + 2 + 3) / (4 * 2)),  # the sum over a fixed length (4) and the rows: 10 / 8 = 1.25
])
def test_each_loss_aggregation_by_hand(aggregation, expected):
    logprobs, mask, advantages = _per_token_loss_batch()
    weights = aggregation_weights(mask, aggregation, num_sequences=2, num_tokens=4, max_length=4)
    loss, _ = clipped_policy_loss(logprobs, logprobs.detach(), advantages, mask, 0.2, 0.2, weights)
    assert loss.item() == pytest.approx(expected)


def test_aggregation_over_two_micro_batches_equals_the_whole():
    logprobs, mask, advantages = _per_token_loss_batch()
    for aggregation in ("token", "sequence", "constant"):
        whole = aggregation_weights(mask, aggregation, 2, 4, 4)
        parts = torch.cat([aggregation_weights(mask[i:i + 1], aggregation, 2, 4, 4) for i in range(2)])
        torch.testing.assert_close(parts, whole)


def test_asymmetric_clipping_at_both_edges():
    # clip_low 0.2, clip_high 0.28: ratios allowed in [0.8, 1.28].
    #  a: A = +1, ratio 1.5  -> -1.5 vs -1 x 1.28 = -1.28 -> max -1.28, clipped (no gradient)
    #  b: A = -1, ratio 0.5  ->  0.5 vs  1 x 0.8  =  0.8  -> max  0.8,  clipped
    #  c: A = +1, ratio 1.25 -> -1.25 both: inside [0.8, 1.28] (a symmetric 0.2 clip would stop it at 1.2)
    #  d: A = -1, ratio 0.85 ->  0.85 both: inside
    # token mean (-1.28 + 0.8 - 1.25 + 0.85) / 4 = -0.22; clip fraction 2 / 4
    ratios = torch.tensor([[1.5, 0.5, 1.25, 0.85]])
    logprobs = ratios.log().clone().requires_grad_(True)
    old = torch.zeros(1, 4)
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    weights = aggregation_weights(mask, "token", 1, 4, 4)
    loss, m = clipped_policy_loss(logprobs, old, advantages, mask, 0.2, 0.28, weights)
    assert loss.item() == pytest.approx(-0.22) and m["clip_fraction"] == 0.5
    loss.backward()
    # d(-A * ratio)/d logp = -A * ratio / 4 where unclipped; 0 where clipped
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, -1.25 / 4, 0.85 / 4]]))
    symmetric, _ = clipped_policy_loss(logprobs, old, advantages, mask, 0.2, 0.2, weights)
    assert symmetric.item() == pytest.approx((-1.2 + 0.8 - 1.2 + 0.85) / 4)  # c is clipped at 1.2 now


def test_kl_loss_is_k3_by_hand():
    # logp -1, ref -2: d = ref - logp = -1, k3 = e^-1 - (-1) - 1 = 0.36788; logp = ref: 0
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-2.0, -2.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, m = kl_loss(logprobs, ref, mask, aggregation_weights(mask, "token", 1, 2, 2))
    assert loss.item() == pytest.approx(math.exp(-1) / 2) and m["kl_loss"] == pytest.approx(math.exp(-1) / 2)
    loss.backward()  # d k3 / d logp = 1 - e^(ref - logp): 1 - e^-1 at token 0, 0 at token 1; halved by the mean
    torch.testing.assert_close(logprobs.grad, torch.tensor([[(1 - math.exp(-1)) / 2, 0.0]]))


# --------------------------------------------------------------------------- the recipe on tiny models

ALGORITHMS = {"grpo": [], "rloo": [], "reinforce_pp": [],
              "online_dpo": ["rl.samples_per_prompt=2", "rl.prompts_per_step=16"]}


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_each_optimiser_raises_the_score(tmp_path, algorithm):
    assert cli.main(["rl", "--config", str(TINY), f"run.output_dir={tmp_path}", f"rl.algorithm={algorithm}",
                     *ALGORITHMS[algorithm]]) == 0
    folder = tmp_path / "tiny" / "rl"
    rows = read_metrics(folder)
    scores = [r["score/mean"] for r in rows]
    assert len(rows) == 12 and scores[-1] > max(scores[0], 0.05) + 0.25, scores
    for key in ("score/std", "kl", "entropy", "response_length", "tokens_per_s", "time/rollout", "time/update"):
        assert key in rows[-1], key
    if algorithm != "online_dpo":
        assert "clip_fraction" in rows[-1] and "approx_kl" in rows[-1]
    assert (folder / "final" / "model.safetensors").exists() and (folder / "DONE").exists()


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_the_first_update_starts_from_the_rollout_policy(tmp_path, algorithm):
    cfg = load_config(rl.Config, TINY, [f"run.output_dir={tmp_path}", f"rl.algorithm={algorithm}",
                                        "reward.spec=rule:length:4", *ALGORITHMS[algorithm]])
    engine = Engine(seed=0)
    setup = rl.build(cfg, engine)
    first, records = rl.rl_step(1, cfg, setup, engine)
    assert first["kl"] == 0.0  # before any update the policy is the reference
    if algorithm == "online_dpo":
        # policy == reference: every implicit reward is 0, the loss log 2
        assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert records[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    else:
        # to float rounding: the update's micro-batches hold other rows than the rollout's forward
        # batches, and each forward drops the columns all its rows pad
        assert records[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
        assert records[0]["ratio_max"] == pytest.approx(1.0, abs=1e-5) and abs(records[0]["approx_kl"]) < 1e-12


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_resume_reproduces_the_uninterrupted_run(tmp_path, algorithm):
    args = ["rl", "--config", str(TINY), f"run.output_dir={tmp_path}", f"rl.algorithm={algorithm}", "rl.steps=4",
            "train.save_every=2", "train.keep_checkpoints=3", "reward.spec=rule:length:4", *ALGORITHMS[algorithm]]
    assert cli.main(args) == 0
    folder = tmp_path / "tiny" / "rl"
    full = read_metrics(folder)
    shutil.rmtree(folder / "checkpoints" / "step-000004")
    shutil.rmtree(folder / "final")
    (folder / "DONE").unlink()
    assert cli.main(args + ["--resume"]) == 0
    resumed = read_metrics(folder)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        for key, value in a.items():
            if key.startswith(("time/", "memory/")) or key == "tokens_per_s" or value is None:
                continue
            assert b[key] == pytest.approx(value, abs=1e-6), (a["step"], key)


def test_filtered_groups_are_counted_and_left_out(tmp_path):
    # A constant reward: every group is uniform, so nothing is left to learn from (and a run that
    # learned nothing is not a success: exit 2, see test_hardening_probe_config.py).
    assert cli.main(["rl", "--config", str(TINY), f"run.output_dir={tmp_path}", "rl.steps=2",
                     "rl.filter_uniform_groups=true", "reward.spec=python:test_rl:constant"]) == 2
    rows = read_metrics(tmp_path / "tiny" / "rl")
    assert [r["filtered_groups"] for r in rows] == [8.0, 8.0]
    assert rows[0].get("policy_loss") is None  # no update ran


def constant(prompts, responses):
    return [1.0] * len(responses)


@pytest.mark.parametrize("override, message", [
    ("rl.algorithm=online_dpo", "set rl.samples_per_prompt=2"),
    ("rl.judge=judge:pairwise", "rl.judge picks pairs for rl.algorithm=online_dpo"),
    ("rl.minibatch_size=64", "more than a step's 32 sequences"),
    ("generation.top_p=0.9", "full softmax"),
    ("rl.algorithm=reinforce_pp rl.filter_uniform_groups=true", "has no groups to filter"),
])
def test_inconsistent_configs_are_one_line_errors(tmp_path, capsys, override, message):
    assert cli.main(["rl", "--config", str(TINY), f"run.output_dir={tmp_path}", *override.split()]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("algorithm", ["grpo"])
def test_a_single_step_update_needs_no_policy_forward_in_the_rollout(tmp_path, algorithm, monkeypatch):
    # One optimizer step on the whole rollout (epochs 1, minibatch = prompts x G): the old
    # log-probs are the update's own forward, detached, so the rollout skips the policy's
    # scoring forward. The update must be the one a scored rollout gives (the sampler's
    # log-probs, used for the KL, are the policy's to float rounding).
    overrides = [f"run.output_dir={tmp_path}", f"rl.algorithm={algorithm}", "reward.spec=rule:length:4",
                 "rl.epochs=1", "rl.minibatch_size=32", "rl.kl_coef=0.1"]
    cfg = load_config(rl.Config, TINY, overrides)
    assert rl.single_step(cfg)
    assert not rl.single_step(load_config(rl.Config, TINY, overrides + ["rl.minibatch_size=16"]))
    # the KL in the reward (RLOO, REINFORCE++, GRPO's kl_in=reward) takes the rollout's log-probs
    for other in (["rl.algorithm=rloo"], ["rl.algorithm=reinforce_pp"], ["rl.kl_in=reward"]):
        assert not rl.single_step(load_config(rl.Config, TINY, overrides + other))
    weights, logs = {}, {}
    for skip in (True, False):
        monkeypatch.setattr(rl, "single_step", lambda c, skip=skip: skip)
        engine = Engine(seed=0)
        setup = rl.build(cfg, engine)
        calls = []
        hook = setup.model.register_forward_pre_hook(lambda *a: calls.append(1))
        logs[skip], records = rl.rl_step(1, cfg, setup, engine)
        hook.remove()
        # the update runs the policy once (one micro-batch of 32 rows); a scored rollout once more
        # (one forward batch of 32 rows); sampling and the frozen reference do not call it. Each
        # of these forwards is two calls: the 8 prompts once, then the 32 answers after them
        logs[skip]["policy_forwards"] = len(calls)
        weights[skip] = {k: v.clone() for k, v in setup.model.state_dict().items()}
        assert records[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert logs[True]["policy_forwards"] == 2 and logs[False]["policy_forwards"] == 4
    assert logs[True]["kl"] == pytest.approx(logs[False]["kl"], abs=1e-5)
    for k in weights[True]:
        torch.testing.assert_close(weights[True][k], weights[False][k], atol=1e-6, rtol=1e-5)
    # the update's forward measures the sampler: in the same precision to float rounding
    assert logs[True]["sampler/logprob_gap"] < 1e-5


def test_a_single_step_update_measures_a_half_precision_samplers_gap(tmp_path):
    # With generation.dtype=bfloat16 the tokens come from a bf16 copy; the single-step update
    # needs no scoring forward for the old log-probs (its own, detached: the ratio is 1) and
    # its forward measures how far the sampler's log-probs are from the trainer's.
    cfg = load_config(rl.Config, TINY, [f"run.output_dir={tmp_path}", "reward.spec=rule:length:4", "rl.epochs=1",
                                        "rl.minibatch_size=32", "generation.dtype=bfloat16"])
    assert rl.single_step(cfg)
    engine = Engine(seed=0)
    setup = rl.build(cfg, engine)
    metrics, records = rl.rl_step(1, cfg, setup, engine)
    assert records[0]["ratio_mean"] == 1.0 and records[0]["ratio_max"] == 1.0
    assert 1e-4 < metrics["sampler/logprob_gap"] < 0.2  # bf16 keeps 8 bits of mantissa
    assert 0 <= metrics["sampler/kl"] < 0.05  # k3 = r - 1 - log r >= 0 per token
