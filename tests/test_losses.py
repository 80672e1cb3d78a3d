"""Hand-computed values and invariants for alignkit.losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import alignkit.losses as losses
from alignkit.losses import (
    dpo_loss,
    entropy_bonus,
    entropy_from_logits,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    pairwise_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logprobs,
    sft_loss,
    simpo_loss,
    token_logprobs,
)

LOG2 = math.log(2)
E = math.e


def softplus(x: float) -> float:
    """log(1 + e^x) = -log sigmoid(-x)."""
    return math.log1p(math.exp(x))


def naive_logprobs(logits, labels, temperature=1.0):
    return F.log_softmax(logits.float() / temperature, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------- token log-probs, entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_token_logprobs_equals_naive_log_softmax_gather(temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    got = token_logprobs(logits, labels, temperature)
    torch.testing.assert_close(got, naive_logprobs(logits, labels, temperature))
    # gradients agree too
    (grad,) = torch.autograd.grad(got.sum(), logits)
    (expected_grad,) = torch.autograd.grad(naive_logprobs(logits, labels, temperature).sum(), logits)
    torch.testing.assert_close(grad, expected_grad)


def test_token_logprobs_chunked_on_a_sliced_tensor(monkeypatch):
    # force several chunks per row: 3 tokens x 11 vocab per chunk
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 33)
    torch.manual_seed(1)
    full = torch.randn(2, 8, 11)
    logits = full[:, :-1]  # the usual shifted, non-contiguous view
    labels = torch.randint(0, 11, (2, 7))
    torch.testing.assert_close(token_logprobs(logits, labels), naive_logprobs(logits, labels))
    torch.testing.assert_close(
        entropy_from_logits(logits), -(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1)
    )


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_and_entropy_gradients_on_sliced_chunked_logits(monkeypatch, temperature):
    # Several pieces per row (3 tokens x 11 vocab each) on the shifted, non-contiguous view:
    # the hand-written backwards must give autograd's gradient of the plain formulas, and
    # gradcheck (float64, finite differences) must agree with them.
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 33)
    torch.manual_seed(2)
    full = torch.randn(3, 9, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 8))
    weights = torch.randn(3, 8, dtype=torch.float64)  # an arbitrary upstream gradient

    def plain_entropy(x):
        logp = F.log_softmax(x / temperature, -1)
        return -(logp.exp() * logp).sum(-1)

    for ours, plain in ((lambda x: token_logprobs(x, labels, temperature),
                         lambda x: naive_logprobs(x, labels, temperature)),
                        (lambda x: entropy_from_logits(x, temperature), plain_entropy)):
        (got,) = torch.autograd.grad((ours(full[:, :-1]) * weights).sum(), full)
        (want,) = torch.autograd.grad((plain(full[:, :-1]).float() * weights).sum(), full)
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-6)
        assert got[:, -1].abs().sum() == 0  # the last position predicts nothing
    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    small = torch.randint(0, 5, (2, 4))
    assert torch.autograd.gradcheck(lambda t: token_logprobs(t, small, temperature), (x,))
    assert torch.autograd.gradcheck(lambda t: entropy_from_logits(t, temperature), (x,))


def test_token_logprobs_gradient_keeps_the_logits_dtype():
    logits = torch.randn(2, 3, 7).bfloat16().requires_grad_()
    token_logprobs(logits, torch.zeros(2, 3, dtype=torch.long)).sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


def test_token_logprobs_temperature_scaling_and_low_precision():
    # logits [2, 0], label 0: at T = 1: log(e^2 / (e^2 + 1)) = -log(1 + e^-2) = -0.126928
    # at T = 2: logits / 2 = [1, 0] -> -log(1 + e^-1) = -0.313262
    logits = torch.tensor([[[2.0, 0.0]]])
    labels = torch.tensor([[0]])
    assert token_logprobs(logits, labels).item() == pytest.approx(-softplus(-2))
    assert token_logprobs(logits, labels, temperature=2.0).item() == pytest.approx(-softplus(-1))
    got = token_logprobs(logits.bfloat16(), labels)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(-softplus(-2), abs=1e-6)
    with pytest.raises(ValueError):
        token_logprobs(logits, labels, temperature=0.0)


def test_token_logprobs_tolerates_ignore_index_labels():
    logits = torch.randn(1, 3, 4)
    labels = torch.tensor([[1, -100, -100]])
    got = token_logprobs(logits, labels)
    assert torch.isfinite(got).all()
    assert got[0, 0].item() == pytest.approx(naive_logprobs(logits, labels.clamp(min=0))[0, 0].item())


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_entropy_of_uniform_distribution_is_log_v(temperature):
    logits = torch.zeros(2, 3, 7)
    torch.testing.assert_close(entropy_from_logits(logits, temperature), torch.full((2, 3), math.log(7)))
    # a near one-hot distribution has ~0 entropy
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]])
    assert entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)


def test_sequence_logprobs_sum_and_average():
    logprobs = torch.tensor([[-1.0, -2.0, -9.0], [-4.0, -9.0, -9.0], [-9.0, -9.0, -9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    assert sequence_logprobs(logprobs, mask).tolist() == [-3.0, -4.0, 0.0]
    assert sequence_logprobs(logprobs, mask, average=True).tolist() == [-1.5, -4.0, 0.0]


# ---------------------------------------------------------------- SFT


def test_sft_loss_hand_value_is_a_token_mean():
    # V = 2. logits [0, 0] -> NLL = log 2. logits [log 3, 0], label 0 -> NLL = -log(3/4) = 0.287682
    a, b = -math.log(3 / 4), LOG2
    logits = torch.tensor(
        [
            [[math.log(3), 0.0], [5.0, 5.0], [5.0, 5.0], [5.0, 5.0]],  # one valid token: NLL a
            [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [9.0, 0.0]],  # three valid tokens: NLL b each
        ]
    )
    labels = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 1]])
    mask = torch.tensor([[True, False, False, False], [True, True, True, False]])
    loss, metrics = sft_loss(logits, labels, mask)
    # token mean (a + 3b) / 4 = 0.591780, not the row mean (a + b) / 2
    assert loss.item() == pytest.approx((a + 3 * b) / 4)
    assert metrics["loss"] == pytest.approx((a + 3 * b) / 4)
    assert metrics["tokens"] == 4.0
    assert metrics["perplexity"] == pytest.approx(math.exp((a + 3 * b) / 4))


def test_sft_loss_gradient_accumulation_1x4_equals_2x2():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 9, requires_grad=True)
    labels = torch.randint(0, 9, (4, 6))
    mask = torch.arange(6)[None] < torch.tensor([6, 1, 3, 2])[:, None]
    full, _ = sft_loss(logits, labels, mask)
    (full_grad,) = torch.autograd.grad(full, logits)
    total_tokens = int(mask.sum())
    parts = [
        sft_loss(logits[i : i + 2], labels[i : i + 2], mask[i : i + 2], num_tokens=total_tokens)[0] for i in (0, 2)
    ]
    accumulated = parts[0] + parts[1]
    (accumulated_grad,) = torch.autograd.grad(accumulated, logits)
    torch.testing.assert_close(accumulated, full)
    torch.testing.assert_close(accumulated_grad, full_grad)


def test_sft_loss_fully_masked_batch_is_zero_not_nan():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss, metrics = sft_loss(logits, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and metrics["tokens"] == 0.0
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- pairwise (reward model)


def test_pairwise_loss_hand_values():
    chosen = torch.tensor([1.0, 0.0])
    rejected = torch.tensor([0.0, 2.0])
    loss, metrics = pairwise_loss(chosen, rejected)
    # pair 1: r_c - r_r = 1.0 - 0.0 = 1 -> -log sigmoid(1) = log(1 + e^-1) = 0.313262
    # pair 2: r_c - r_r = 0.0 - 2.0 = -2 -> log(1 + e^2) = 2.126928
    assert loss.item() == pytest.approx((softplus(-1) + softplus(2)) / 2)
    assert metrics["accuracy"] == 0.5
    assert metrics["score_margin"] == pytest.approx((1 - 2) / 2)
    assert metrics["chosen_score"] == pytest.approx(0.5)
    assert metrics["rejected_score"] == pytest.approx(1.0)


def test_pairwise_loss_is_shift_invariant_and_ties_count_wrong():
    torch.manual_seed(0)
    chosen, rejected = torch.randn(8), torch.randn(8)
    loss, _ = pairwise_loss(chosen, rejected)
    shifted, _ = pairwise_loss(chosen + 3.7, rejected + 3.7)
    torch.testing.assert_close(loss, shifted)
    # a tie: loss log 2, accuracy 0
    tie_loss, tie_metrics = pairwise_loss(torch.tensor([0.5]), torch.tensor([0.5]))
    assert tie_loss.item() == pytest.approx(LOG2)
    assert tie_metrics["accuracy"] == 0.0


def test_pairwise_margin_equals_shifting_chosen_down():
    torch.manual_seed(1)
    chosen, rejected = torch.randn(6), torch.randn(6)
    margin = torch.rand(6)
    with_margin, _ = pairwise_loss(chosen, rejected, margin)
    shifted, _ = pairwise_loss(chosen - margin, rejected)
    torch.testing.assert_close(with_margin, shifted)
    # a float margin too; r_c - r_r = 1, m = 1 -> log 2
    assert pairwise_loss(torch.tensor([1.0]), torch.tensor([0.0]), 1.0)[0].item() == pytest.approx(LOG2)


def test_pairwise_loss_stays_finite_for_huge_gaps():
    loss, _ = pairwise_loss(torch.tensor([0.0]), torch.tensor([1000.0]))
    assert loss.item() == pytest.approx(1000.0)


# ---------------------------------------------------------------- DPO, IPO, SimPO, KTO


# policy chosen -1, rejected -3; reference -2, -2 -> h = (-1 - -3) - (-2 - -2) = 2
DPO_ARGS = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))


def test_dpo_loss_hand_value_and_metrics():
    pc = torch.tensor([-1.0], requires_grad=True)
    loss, metrics = dpo_loss(pc, *DPO_ARGS[1:], beta=0.5)
    # beta * h = 0.5 * 2 = 1 -> -log sigmoid(1) = 0.313262
    assert loss.item() == pytest.approx(softplus(-1))
    # chosen reward = 0.5 * (-1 - -2) = 0.5; rejected = 0.5 * (-3 - -2) = -0.5
    assert metrics["chosen_reward"] == pytest.approx(0.5)
    assert metrics["rejected_reward"] == pytest.approx(-0.5)
    assert metrics["reward_margin"] == pytest.approx(1.0)
    assert metrics["reward_accuracy"] == 1.0
    # d loss / d pc = -beta * (1 - sigmoid(1)) = -0.5 * 0.268941 = -0.134471
    loss.backward()
    assert pc.grad.item() == pytest.approx(-0.5 * (1 - 1 / (1 + math.exp(-1))))


def test_dpo_label_smoothing_hand_value():
    loss, _ = dpo_loss(*DPO_ARGS, beta=0.5, label_smoothing=0.1)
    # 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1) = 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262
    assert loss.item() == pytest.approx(0.9 * softplus(-1) + 0.1 * softplus(1))


@pytest.mark.parametrize("beta,label_smoothing", [(0.1, 0.0), (1.0, 0.0), (0.5, 0.2)])
def test_dpo_loss_is_log2_when_policy_equals_reference(beta, label_smoothing):
    torch.manual_seed(0)
    chosen, rejected = -10 * torch.rand(5), -10 * torch.rand(5)
    loss, metrics = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta, label_smoothing)
    assert loss.item() == pytest.approx(LOG2)
    assert metrics["reward_margin"] == 0.0
    assert metrics["reward_accuracy"] == 0.0  # ties are not correct


def test_dpo_label_smoothing_half_is_symmetric_with_zero_gradient_at_zero():
    h = torch.tensor([0.0, 0.7, -0.7, 3.0, -3.0], requires_grad=True)
    zeros = torch.zeros(5)
    loss_pos, _ = dpo_loss(h, zeros, zeros, zeros, beta=1.0, label_smoothing=0.5)
    loss_neg, _ = dpo_loss(-h, zeros, zeros, zeros, beta=1.0, label_smoothing=0.5)
    torch.testing.assert_close(loss_pos, loss_neg)
    (grad,) = torch.autograd.grad(loss_pos, h)
    assert grad[0].item() == pytest.approx(0.0, abs=1e-7)


def test_dpo_beta_limits():
    zeros = torch.zeros(1)
    # beta -> 0: no preference signal, loss -> log 2 whatever h is
    assert dpo_loss(torch.tensor([5.0]), zeros, zeros, zeros, beta=1e-6)[0].item() == pytest.approx(LOG2, abs=1e-5)
    # beta large: right side -> 0, wrong side -> beta * |h|
    assert dpo_loss(torch.tensor([1.0]), zeros, zeros, zeros, beta=1000.0)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert dpo_loss(torch.tensor([-1.0]), zeros, zeros, zeros, beta=1000.0)[0].item() == pytest.approx(1000.0)


def test_dpo_reference_gets_no_gradient():
    ref_chosen = torch.tensor([-2.0], requires_grad=True)
    loss, _ = dpo_loss(torch.tensor([-1.0], requires_grad=True), DPO_ARGS[1], ref_chosen, DPO_ARGS[3], 0.1)
    loss.backward()
    assert ref_chosen.grad is None


def test_ipo_loss_hand_value():
    # h = [2, 0.5] (second pair: policy -1 vs -1.5, reference equal); beta = 0.5 -> target 1 / (2 * 0.5) = 1
    # (2 - 1)^2 = 1, (0.5 - 1)^2 = 0.25 -> mean 0.625
    reference = torch.tensor([-2.0, -2.0])
    loss, metrics = ipo_loss(torch.tensor([-1.0, -1.0]), torch.tensor([-3.0, -1.5]), reference, reference, beta=0.5)
    assert loss.item() == pytest.approx(0.625)
    # chosen rewards 0.5 * [1, 1], rejected 0.5 * [-1, 0.5]
    assert metrics["chosen_reward"] == pytest.approx(0.5)
    assert metrics["rejected_reward"] == pytest.approx(-0.125)
    # beta = 0.25 -> target 2 = h of the first pair -> 0
    assert ipo_loss(*DPO_ARGS, beta=0.25)[0].item() == pytest.approx(0.0)


def test_simpo_loss_hand_value():
    # chosen: logp -4 over 4 tokens -> avg -1; rejected: -9 over 3 -> avg -3
    # beta = 2: rewards -2 and -6; gap 4 - gamma 1 = 3 -> log(1 + e^-3) = 0.048587
    loss, metrics = simpo_loss(
        torch.tensor([-4.0]), torch.tensor([-9.0]), torch.tensor([4]), torch.tensor([3]), beta=2.0, gamma=1.0
    )
    assert loss.item() == pytest.approx(softplus(-3))
    assert metrics["chosen_reward"] == pytest.approx(-2.0)
    assert metrics["rejected_reward"] == pytest.approx(-6.0)
    assert metrics["reward_accuracy"] == 1.0
    # a zero length does not divide by zero
    zero_len, _ = simpo_loss(torch.tensor([0.0]), torch.tensor([-1.0]), torch.tensor([0]), torch.tensor([0]), 2.0, 1.0)
    assert math.isfinite(zero_len.item())


def test_kto_loss_hand_value():
    # r = policy - ref = [-1 - -2, -2 - -1] = [1, -1]; first desirable, second undesirable; z0 = 0.5, beta = 1
    # desirable:   1 - sigmoid(1 - 0.5)    = 1 - 0.622459 = 0.377541
    # undesirable: 1 - sigmoid(0.5 - -1)   = 1 - 0.817574 = 0.182426
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    desirable, undesirable = 1 - sigmoid(0.5), 1 - sigmoid(1.5)
    args = (torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0]), torch.tensor([True, False]), torch.tensor(0.5))
    loss, metrics = kto_loss(*args, beta=1.0)
    assert loss.item() == pytest.approx((desirable + undesirable) / 2)  # 0.279983
    assert metrics["desirable_reward"] == pytest.approx(1.0)
    assert metrics["undesirable_reward"] == pytest.approx(-1.0)
    assert metrics["desirable_count"] == 1.0 and metrics["undesirable_count"] == 1.0
    assert metrics["kl_ref_point"] == pytest.approx(0.5)
    weighted, _ = kto_loss(*args, beta=1.0, desirable_weight=2.0, undesirable_weight=0.5)
    assert weighted.item() == pytest.approx((2 * desirable + 0.5 * undesirable) / 2)  # 0.423148


def test_kto_with_one_group_empty_has_no_nan():
    logps = torch.tensor([-1.0, -2.0])
    loss, metrics = kto_loss(logps, logps.clone(), torch.tensor([True, True]), 0.0, 0.1)
    # r = 0 = z0 -> 1 - sigmoid(0) = 0.5
    assert loss.item() == pytest.approx(0.5)
    assert metrics["undesirable_reward"] == 0.0 and metrics["undesirable_count"] == 0.0


def test_kto_reference_point_is_clamped_mean_and_detached():
    policy = torch.tensor([-1.0, -1.0], requires_grad=True)
    # policy - ref = [1, 2] -> mean 1.5
    z0 = kto_reference_point(policy, torch.tensor([-2.0, -3.0]))
    assert z0.item() == pytest.approx(1.5) and not z0.requires_grad
    # [1, -3] -> mean -1 -> clamped to 0
    assert kto_reference_point(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, 0.0])).item() == 0.0


# ---------------------------------------------------------------- PPO


def test_ppo_policy_loss_clipped_above_with_positive_advantage():
    old_logprobs = torch.tensor([[-2.0, -1.0, -3.0]])
    logprobs = (old_logprobs + 1.0).requires_grad_()
    advantages = torch.ones(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, metrics = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
    # ratio is [e, e, e]; clipped ratio becomes [1.2, 1.2, 1.2]
    # pg_loss1 = -1 * e = -2.718, pg_loss2 = -1 * 1.2 = -1.2 -> max = -1.2 on every token
    assert loss.item() == pytest.approx(-1.2)
    assert metrics["clip_fraction"] == 1.0
    assert metrics["ratio_mean"] == pytest.approx(E) and metrics["ratio_max"] == pytest.approx(E)
    # approx KL(old || new) by k3: (ratio - 1) - log ratio = (e - 1) - 1 = 0.718282
    assert metrics["approx_kl"] == pytest.approx(E - 2)
    # the clipped term is constant: no gradient
    loss.backward()
    assert torch.equal(logprobs.grad, torch.zeros(1, 3))


def test_ppo_policy_loss_clipped_below_with_negative_advantage():
    old_logprobs = torch.tensor([[-2.0, -1.0, -3.0]])
    logprobs = old_logprobs - 1.0
    advantages = -torch.ones(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, metrics = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
    # ratio is [e^-1] * 3 = 0.3679; clipped ratio becomes [0.8] * 3
    # pg_loss1 = -(-1) * 0.3679 = 0.3679, pg_loss2 = -(-1) * 0.8 = 0.8 -> max = 0.8
    assert loss.item() == pytest.approx(0.8)
    assert metrics["clip_fraction"] == 1.0


def test_ppo_policy_loss_unclipped_sides_keep_the_pessimistic_term():
    old_logprobs = torch.zeros(1, 2)
    logprobs = torch.tensor([[-1.0, 1.0]], requires_grad=True)
    advantages = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, metrics = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
    # token 0: A = 1, ratio e^-1: pg_loss1 = -0.3679, pg_loss2 = -0.8 -> max = -0.3679 (unclipped)
    # token 1: A = -1, ratio e:   pg_loss1 = 2.7183,  pg_loss2 = 1.2  -> max = 2.7183 (unclipped)
    assert loss.item() == pytest.approx((-math.exp(-1) + E) / 2)
    assert metrics["clip_fraction"] == 0.0
    # d/d logprob of -A * exp(logprob - old) / 2 tokens = -A * ratio / 2
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-math.exp(-1) / 2, E / 2]]))


def test_ppo_policy_loss_ratio_one_is_minus_mean_advantage():
    torch.manual_seed(0)
    logprobs = -torch.rand(3, 4)
    advantages = torch.randn(3, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    loss, metrics = ppo_policy_loss(logprobs, logprobs.clone(), advantages, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-advantages.mean().item(), abs=1e-6)
    assert metrics["clip_fraction"] == 0.0
    assert metrics["approx_kl"] == 0.0
    assert metrics["ratio_mean"] == 1.0 and metrics["ratio_max"] == 1.0


def test_ppo_policy_loss_fully_masked_row_changes_nothing_and_gives_no_nan():
    torch.manual_seed(1)
    logprobs = -torch.rand(2, 4)
    old_logprobs = logprobs + 0.1 * torch.randn(2, 4)
    advantages = torch.randn(2, 4)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    loss, metrics = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, 0.2)

    # add a fully masked row full of garbage: a huge log-ratio and a NaN advantage
    padded_logprobs = torch.cat([logprobs, torch.full((1, 4), 500.0)]).requires_grad_()
    padded_old = torch.cat([old_logprobs, torch.full((1, 4), -500.0)])
    padded_adv = torch.cat([advantages, torch.full((1, 4), float("nan"))])
    padded_mask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.bool)])
    padded_loss, padded_metrics = ppo_policy_loss(padded_logprobs, padded_old, padded_adv, padded_mask, 0.2)
    padded_loss.backward()
    torch.testing.assert_close(padded_loss, loss)
    assert padded_metrics == pytest.approx(metrics)
    assert torch.isfinite(padded_logprobs.grad).all()

    # everything masked: 0, not NaN
    empty_loss, empty_metrics = ppo_policy_loss(logprobs, old_logprobs, advantages, torch.zeros_like(mask), 0.2)
    assert empty_loss.item() == 0.0
    assert all(math.isfinite(v) for v in empty_metrics.values())


def test_ppo_value_loss_clipping_on_each_side():
    # token 0: old 0, v 1, R 1: unclipped (1 - 1)^2 = 0; clipped v = 0 + 0.2 -> (0.2 - 1)^2 = 0.64 -> 0.64
    # token 1: old 0, v -1, R -1: clipped v = -0.2 -> (-0.2 + 1)^2 = 0.64 -> 0.64
    # token 2: old 0, v 1, R 0: unclipped 1, clipped (0.2 - 0)^2 = 0.04 -> 1
    # loss = 0.5 * (0.64 + 0.64 + 1) / 3 = 0.38; the clipped term wins on 2 of 3 tokens
    values = torch.tensor([[1.0, -1.0, 1.0, 123.0]], requires_grad=True)
    old_values = torch.tensor([[0.0, 0.0, 0.0, float("nan")]])
    returns = torch.tensor([[1.0, -1.0, 0.0, float("nan")]])
    mask = torch.tensor([[True, True, True, False]])
    loss, metrics = ppo_value_loss(values, old_values, returns, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.38)
    assert metrics["value_loss"] == pytest.approx(0.38)
    assert metrics["value_clip_fraction"] == pytest.approx(2 / 3)
    # clipped tokens get no gradient; token 2: d/dv 0.5 * (v - R)^2 / 3 = (1 - 0) / 3
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.0, 1 / 3, 0.0]]))


def test_ppo_value_loss_without_clipping():
    values = torch.tensor([[1.0, -1.0, 1.0]])
    returns = torch.tensor([[1.0, -1.0, 0.0]])
    loss, metrics = ppo_value_loss(values, torch.zeros(1, 3), returns, torch.ones(1, 3, dtype=torch.bool), None)
    # 0.5 * (0 + 0 + 1) / 3 = 1/6
    assert loss.item() == pytest.approx(1 / 6)
    assert metrics["value_clip_fraction"] == 0.0


def test_entropy_bonus_is_the_masked_mean_entropy():
    entropies = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    bonus, metrics = entropy_bonus(entropies, mask)
    # (1 + 2 + 3) / 3 = 2
    assert bonus.item() == pytest.approx(2.0)
    assert metrics == {"entropy": pytest.approx(2.0)}
    bonus.backward()
    assert entropies.grad[mask].tolist() == pytest.approx([1 / 3] * 3)


# ---------------------------------------------------------------- every loss is differentiable


def _leaf(*shape):
    return torch.randn(*shape).requires_grad_()


@pytest.mark.parametrize(
    "make_loss",
    [
        lambda: sft_loss(_leaf(2, 3, 5), torch.randint(0, 5, (2, 3)), torch.ones(2, 3, dtype=torch.bool)),
        lambda: pairwise_loss(_leaf(4), _leaf(4), torch.ones(4)),
        lambda: dpo_loss(_leaf(4), _leaf(4), torch.randn(4), torch.randn(4), 0.1, 0.1),
        lambda: ipo_loss(_leaf(4), _leaf(4), torch.randn(4), torch.randn(4), 0.1),
        lambda: simpo_loss(_leaf(4), _leaf(4), torch.tensor([3, 4, 5, 6]), torch.tensor([2, 2, 2, 2]), 2.0, 0.5),
        lambda: kto_loss(_leaf(4), torch.randn(4), torch.tensor([True, False, True, False]), torch.tensor(0.1), 0.1),
        lambda: ppo_policy_loss(_leaf(2, 3), torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3), 0.2),
        lambda: ppo_value_loss(_leaf(2, 3), torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3), 0.2),
        lambda: entropy_bonus(entropy_from_logits(_leaf(2, 3, 5)), torch.ones(2, 3)),
    ],
    ids=["sft", "pairwise", "dpo", "ipo", "simpo", "kto", "ppo_policy", "ppo_value", "entropy"],
)
def test_every_loss_is_a_differentiable_scalar_with_float_metrics(make_loss):
    torch.manual_seed(0)
    loss, metrics = make_loss()
    assert loss.dim() == 0 and loss.requires_grad
    loss.backward()
    assert metrics and all(type(value) is float for value in metrics.values())
