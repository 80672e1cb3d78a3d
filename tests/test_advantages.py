"""Hand-computed values and invariants for alignkit.advantages."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.advantages import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_shaped_rewards,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    whiten,
)


def ragged_mask(lengths: list[int], steps: int) -> torch.Tensor:
    """Right-padded (B, T) mask with the given number of valid tokens per row."""
    return torch.arange(steps)[None, :] < torch.tensor(lengths)[:, None]


# ---------------------------------------------------------------- masked stats


def test_masked_mean_is_over_all_valid_tokens_not_mean_of_row_means():
    x = torch.tensor([[1.0, 99.0, 99.0], [2.0, 4.0, 6.0]])
    mask = torch.tensor([[True, False, False], [True, True, True]])
    # valid tokens: 1, 2, 4, 6 -> 13 / 4 = 3.25 (row means would give (1 + 4) / 2 = 2.5)
    assert masked_mean(x, mask).item() == pytest.approx(3.25)
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([1.0, 4.0])
    assert masked_sum(x, mask).item() == pytest.approx(13.0)


def test_masked_stats_of_nothing_are_zero_not_nan():
    x = torch.tensor([[1.0, 2.0], [3.0, float("nan")]])
    mask = torch.tensor([[False, False], [True, False]])
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    assert masked_var(x, torch.zeros_like(mask)).item() == 0.0
    # one valid token: unbiased variance has no degrees of freedom -> 0
    assert masked_var(x, mask).item() == 0.0
    # the empty row gets 0; the NaN in padding does not leak
    assert masked_mean(x, mask, dim=1).tolist() == [0.0, 3.0]
    assert masked_whiten(x, torch.zeros_like(mask)).abs().sum().item() == 0.0


def test_masked_mean_accepts_0_1_float_mask():
    x = torch.tensor([1.0, 2.0, 3.0])
    assert masked_mean(x, torch.tensor([1.0, 0.0, 1.0])).item() == pytest.approx(2.0)


def test_masked_var_hand_value():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    # mean 2; squared deviations 1 + 0 + 1 = 2; unbiased 2 / (3 - 1) = 1, biased 2 / 3
    assert masked_var(x, mask).item() == pytest.approx(1.0)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2 / 3)


def test_whiten_gives_mean_0_var_1_over_valid_tokens_and_ignores_padding():
    torch.manual_seed(0)
    x = torch.randn(4, 7) * 3 + 5
    mask = ragged_mask([7, 3, 5, 1], 7)
    out = masked_whiten(x, mask)
    assert masked_mean(out, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(out, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert (out[~mask] == 0).all()
    # changing a padded value changes nothing
    x2 = x.clone()
    x2[~mask] = 1e6
    assert torch.equal(masked_whiten(x2, mask), out)
    assert whiten is masked_whiten


def test_whiten_without_shift_keeps_the_mean():
    torch.manual_seed(1)
    x = torch.randn(3, 5) + 2
    mask = ragged_mask([5, 2, 4], 5)
    out = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(out, mask).item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-5)
    assert masked_var(out, mask).item() == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- KL estimators


def test_kl_estimators_hand_values():
    logprobs = torch.tensor([[0.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.0, -1.0]])
    # log p - log q = [1, 0]
    torch.testing.assert_close(kl_k1(logprobs, ref_logprobs), torch.tensor([[1.0, 0.0]]))
    # 0.5 * 1^2 = 0.5
    torch.testing.assert_close(kl_k2(logprobs, ref_logprobs), torch.tensor([[0.5, 0.0]]))
    # d = log q - log p = -1 -> e^-1 - (-1) - 1 = e^-1 = 0.36788
    torch.testing.assert_close(kl_k3(logprobs, ref_logprobs), torch.tensor([[math.exp(-1), 0.0]]))
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_k1_and_k3_are_unbiased_estimates_of_kl():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    true_kl = (p * (p / q).log()).sum().item()  # 0.2749
    tokens = torch.multinomial(p, 200_000, replacement=True)
    logp, logq = p.log()[tokens], q.log()[tokens]
    assert kl_k1(logp, logq).mean().item() == pytest.approx(true_kl, abs=0.01)
    assert kl_k3(logp, logq).mean().item() == pytest.approx(true_kl, abs=0.01)
    assert (kl_k3(logp, logq) >= 0).all()


# ---------------------------------------------------------------- KL-shaped rewards


def test_kl_shaped_rewards_puts_the_score_at_the_last_valid_token():
    scores = torch.tensor([2.0, 3.0, 5.0])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -9.0], [-1.0, -9.0, -9.0, -9.0], [-1.0, -1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -3.0, 0.0], [-2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = ragged_mask([3, 1, 0], 4)
    rewards, kl = kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    # row 0: kl = [-1 + 1.5, -2 + 1, -3 + 3] = [0.5, -1, 0]; rewards = -0.1 * kl, + 2 at t = 2
    # row 1: kl = [-1 + 2] = [1]; reward = -0.1 + 3 at t = 0
    # row 2: no valid token -> nothing
    expected_kl = torch.tensor([[0.5, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    expected_rewards = torch.tensor([[-0.05, 0.1, 2.0, 0.0], [2.9, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(rewards, expected_rewards)


def test_kl_shaped_rewards_estimators_and_no_grad():
    logprobs = torch.tensor([[0.0, -1.0]], requires_grad=True)
    ref_logprobs = torch.tensor([[-1.0, -1.0]])
    mask = torch.tensor([[True, True]])
    rewards, kl = kl_shaped_rewards(torch.tensor([1.0]), logprobs, ref_logprobs, mask, 0.5, kl_estimator="k3")
    # k3 = [e^-1, 0]; rewards = [-0.5 e^-1, 0 + 1]
    torch.testing.assert_close(kl, torch.tensor([[math.exp(-1), 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.5 * math.exp(-1), 1.0]]))
    assert not rewards.requires_grad and not kl.requires_grad
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_shaped_rewards(torch.tensor([1.0]), logprobs, ref_logprobs, mask, 0.5, kl_estimator="k4")


# ---------------------------------------------------------------- GAE


def reference_gae(values, rewards, lengths, gamma, lam):
    """Plain python GAE, one row at a time, over the valid prefix only."""
    advantages, returns = [], []
    for v, r, n in zip(values.tolist(), rewards.tolist(), lengths):
        adv = [0.0] * len(v)
        running = 0.0
        for t in reversed(range(n)):
            next_value = v[t + 1] if t + 1 < n else 0.0
            delta = r[t] + gamma * next_value - v[t]
            running = delta + gamma * lam * running
            adv[t] = running
        advantages.append(adv)
        returns.append([a + v[t] if t < n else 0.0 for t, a in enumerate(adv)])
    return torch.tensor(advantages), torch.tensor(returns)


def test_gae_three_step_hand_value():
    values = torch.tensor([[0.5, 1.0, 1.5, 7.0]])  # t = 3 is padding: ignored
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0]])
    mask = ragged_mask([3], 4)
    advantages, returns = gae(values, rewards, mask, gamma=0.9, lam=0.8)
    # gamma * lam = 0.72
    # delta_2 = 1 + 0.9 * 0 (episode over) - 1.5 = -0.5;  A_2 = -0.5
    # delta_1 = 0 + 0.9 * 1.5 - 1.0 = 0.35;  A_1 = 0.35 + 0.72 * -0.5 = -0.01
    # delta_0 = 0 + 0.9 * 1.0 - 0.5 = 0.4;   A_0 = 0.4 + 0.72 * -0.01 = 0.3928
    torch.testing.assert_close(advantages, torch.tensor([[0.3928, -0.01, -0.5, 0.0]]))
    # returns = A + V = [0.8928, 0.99, 1.0]
    torch.testing.assert_close(returns, torch.tensor([[0.8928, 0.99, 1.0, 0.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 0.7)])
def test_gae_matches_python_reference_on_ragged_rows(gamma, lam):
    torch.manual_seed(0)
    lengths = [6, 1, 0, 4, 3]
    values = torch.randn(5, 6)
    rewards = torch.randn(5, 6)
    mask = ragged_mask(lengths, 6)
    advantages, returns = gae(values, rewards, mask, gamma, lam)
    expected_advantages, expected_returns = reference_gae(values, rewards, lengths, gamma, lam)
    torch.testing.assert_close(advantages, expected_advantages)
    torch.testing.assert_close(returns, expected_returns)


def test_gae_with_gamma_lam_one_gives_reward_to_go():
    torch.manual_seed(2)
    values = torch.randn(2, 5)
    rewards = torch.randn(2, 5)
    mask = ragged_mask([5, 3], 5)
    _, returns = gae(values, rewards, mask, gamma=1.0, lam=1.0)
    masked_rewards = torch.where(mask, rewards, 0.0)
    reward_to_go = masked_rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(returns, torch.where(mask, reward_to_go, 0.0))


def test_gae_has_no_gradient_and_ignores_padding_values():
    values = torch.randn(2, 4, requires_grad=True)
    rewards = torch.randn(2, 4)
    mask = ragged_mask([4, 2], 4)
    advantages, returns = gae(values, rewards, mask, 0.99, 0.95)
    assert not advantages.requires_grad and not returns.requires_grad
    values2 = values.detach().clone()
    rewards2 = rewards.clone()
    values2[~mask] = 1e3
    rewards2[~mask] = float("nan")
    advantages2, returns2 = gae(values2, rewards2, mask, 0.99, 0.95)
    assert torch.equal(advantages, advantages2) and torch.equal(returns, returns2)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    mask = torch.tensor([[True, True, True, False]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    # predicting the mean (2) explains nothing: 1 - Var[R - 2] / Var[R] = 0
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)
    assert math.isnan(explained_variance(returns, torch.ones_like(returns), mask))


# ---------------------------------------------------------------- KL controllers


def test_fixed_kl_controller_never_moves():
    controller = FixedKLController(0.05)
    controller.update(100.0, 256)
    assert controller.value == 0.05
    restored = FixedKLController(1.0)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == 0.05


def test_adaptive_kl_controller_moves_the_right_way_and_clips_the_error():
    # n_steps / horizon = 256 / 10000 = 0.0256
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    controller.update(6.6, 256)  # error 6.6 / 6 - 1 = 0.1 -> x (1 + 0.1 * 0.0256)
    assert controller.value == pytest.approx(0.1 * 1.00256)

    controller = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    controller.update(60.0, 256)  # error 9 clipped to 0.2 -> x (1 + 0.2 * 0.0256) = x 1.00512
    assert controller.value == pytest.approx(0.100512)

    controller = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    controller.update(torch.tensor(0.0), 256)  # error -1 clipped to -0.2 -> x 0.99488
    assert controller.value == pytest.approx(0.099488)


def test_adaptive_kl_controller_checkpoint_round_trip():
    controller = AdaptiveKLController(0.2, target=1.0, horizon=100)
    for kl in [3.0, 2.0, 0.5]:
        controller.update(kl, 10)
    restored = AdaptiveKLController(0.2, target=1.0, horizon=100)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value
    controller.update(4.0, 10)
    restored.update(4.0, 10)
    assert restored.value == controller.value
