"""Per-token statistics, KL-shaped rewards, GAE and KL controllers for PPO.

Pure tensor functions: no models, no configs. Shapes use ``B`` for the batch
(sequences) and ``T`` for tokens. ``mask`` is a bool (or 0/1) tensor, True =
valid token; every statistic here is taken over valid tokens only, and a
selection with no valid token gives 0, never NaN.

``losses.py`` builds on ``masked_mean`` and the KL estimators defined here, so
the dependency runs one way (losses -> advantages) and each formula is written
once.

References:
    Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
        Advantage Estimation" (GAE), eq. 16.
    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
        sec. 2.2 (KL-penalised reward, adaptive KL coefficient).
    Schulman 2020, "Approximating KL Divergence" (k1, k2, k3 estimators),
        http://joschu.net/blog/kl-approx.html
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "whiten",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "KL_ESTIMATORS",
    "kl_shaped_rewards",
    "gae",
    "explained_variance",
    "FixedKLController",
    "AdaptiveKLController",
]

# Added to the variance before the square root so that whitening a constant
# (or a single token) gives zeros instead of a division by zero.
WHITEN_EPS = 1e-8


def _bool_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mask`` as bool, broadcast to ``like``'s shape (so counts are right)."""
    return mask.bool().expand_as(like)


# --------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over valid positions.

    Invalid positions are selected out with ``torch.where`` rather than
    multiplied by 0, so a NaN or inf sitting in padding cannot leak in.

    Args:
        x: any shape, e.g. ``(B, T)``.
        mask: same shape as ``x`` (or broadcastable to it), True = valid.
        dim: dimension to reduce; None reduces everything to a scalar.
    """
    mask = _bool_mask(mask, x)
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def _count(mask: torch.Tensor, like: torch.Tensor, dim: int | None) -> torch.Tensor:
    mask = _bool_mask(mask, like)
    count = mask.sum() if dim is None else mask.sum(dim)
    return count.to(like.dtype if like.is_floating_point() else torch.float32)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over valid positions; 0 where there is no valid position.

    With ``dim=None`` this is the mean over *all* valid tokens of the batch
    (a long row weighs more than a short one), not the mean of per-row means.

    Args:
        x: ``(B, T)`` (any shape works).
        mask: same shape as ``x``, True = valid.
        dim: None -> scalar; ``dim=1`` on ``(B, T)`` -> ``(B,)`` per-row means.
    """
    return masked_sum(x, mask, dim) / _count(mask, x, dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all valid positions (a scalar tensor).

    ``unbiased=True`` divides by ``n - 1`` (Bessel's correction). Fewer valid
    positions than the correction needs (n = 0, or n = 1 when unbiased) give 0.

    Args:
        x: ``(B, T)`` (any shape works).
        mask: same shape as ``x``, True = valid.
    """
    n = _count(mask, x, None)
    centered = x - masked_mean(x, mask)
    sum_sq = masked_sum(centered.square(), mask)
    denominator = n - 1 if unbiased else n
    return sum_sq / denominator.clamp(min=1)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = WHITEN_EPS,
) -> torch.Tensor:
    """Normalise ``x`` to mean 0 and (unbiased) variance 1 over valid tokens.

    Statistics ignore padding entirely, so the values sitting in padding do not
    change the result; padding positions are 0 in the output.

    ``shift_mean=False`` scales by the standard deviation but keeps the mean,
    which is how rewards are usually normalised (their sign carries meaning),
    while advantages are fully whitened.

    Note: the statistics are those of this tensor on this process; under data
    parallelism each rank whitens its own share.

    Args:
        x: ``(B, T)``.
        mask: ``(B, T)``, True = valid.

    Returns:
        ``(B, T)``, same dtype as ``x``.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    mask = _bool_mask(mask, x)
    return torch.where(mask, whitened, torch.zeros((), dtype=whitened.dtype, device=x.device))


whiten = masked_whiten


# --------------------------------------------------------------------------
# KL estimators (Schulman 2020). Samples come from the first argument's
# distribution; each returns a per-token estimate of KL(logprobs || ref).
# --------------------------------------------------------------------------


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log p - log q: unbiased, high variance, can be negative per token.

    Args:
        logprobs, ref_logprobs: ``(B, T)`` log-probabilities of the sampled
            tokens under the policy (p, the sampling distribution) and the
            reference (q).

    Returns:
        ``(B, T)`` elementwise estimate of KL(p || q).
    """
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 * (log p - log q)^2: biased, low variance, always >= 0.

    Shapes as in :func:`kl_k1`.
    """
    return 0.5 * (logprobs - ref_logprobs).square()


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(log q - log p) - (log q - log p) - 1: unbiased, low variance, >= 0.

    Computed as ``expm1(d) - d`` with ``d = log q - log p`` for precision near
    0. It grows exponentially when the reference is far more likely than the
    policy on a token; callers that fear outliers may clamp the result.

    Shapes as in :func:`kl_k1`.
    """
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


# --------------------------------------------------------------------------
# Rewards and advantages
# --------------------------------------------------------------------------


def _last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` index of each row's last valid token; -1 for a row with none."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).amax(dim=-1)


@torch.no_grad()
def kl_shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    kl_estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards: a KL penalty on every token, the score at the end.

    Ziegler et al. 2019, eq. 2: R(x, y) = r(x, y) - beta * log(pi(y|x) / rho(y|x)),
    spread over tokens: token t gets ``-kl_coef * kl_t`` and the last valid
    token of each row additionally gets the sequence ``score``.

    Rows may have different lengths (right padding); a row with no valid token
    gets no reward at all. The result carries no gradient: rewards are targets.

    Args:
        scores: ``(B,)`` sequence-level scores (reward model, judge, rules).
        logprobs: ``(B, T)`` log-probs of the sampled tokens under the policy
            that generated them.
        ref_logprobs: ``(B, T)`` the same tokens under the frozen reference.
        mask: ``(B, T)``, True = generated (valid) token.
        kl_coef: the KL coefficient beta (float, or a scalar tensor).
        kl_estimator: "k1" (the usual choice for the reward penalty), "k2" or
            "k3"; see :data:`KL_ESTIMATORS`.

    Returns:
        ``(rewards, kl)``, both ``(B, T)`` float, 0 at invalid positions;
        ``kl`` is the per-token estimate that was penalised.
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {kl_estimator!r}")
    mask = _bool_mask(mask, logprobs)
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    kl = KL_ESTIMATORS[kl_estimator](logprobs.to(dtype), ref_logprobs.to(dtype))
    kl = torch.where(mask, kl, torch.zeros((), dtype=dtype, device=kl.device))
    rewards = -kl_coef * kl

    last = _last_valid_index(mask)
    has_tokens = last >= 0
    rows = torch.arange(rewards.shape[0], device=rewards.device)[has_tokens]
    rewards[rows, last[has_tokens]] += scores.to(dtype)[has_tokens]
    return rewards, kl


@torch.no_grad()
def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage: each sample's score against the other samples of its prompt.

    Shao et al. 2024 (DeepSeekMath), sec. 4.1.2, outcome supervision:
    ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)``, the same for every
    token of sample i. ``scale=False`` drops the division by the std, as Dr. GRPO
    (Liu et al. 2025, sec. 3.2) does: dividing by a small std up-weights prompts
    whose answers all score alike. The std is the sample std (n - 1), as TRL and
    OpenRLHF compute it.

    Args:
        scores: ``(B,)`` with ``B = n_prompts * group_size``, prompt-major: the
            ``group_size`` samples of prompt g are rows ``g*G .. g*G + G - 1``.
        group_size: G >= 2.

    Returns:
        ``(B,)`` advantages (no gradient).
    """
    if group_size < 2 or scores.numel() % group_size:
        raise ValueError(f"group_size must be >= 2 and divide the {scores.numel()} scores, got {group_size}")
    groups = scores.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


@torch.no_grad()
def leave_one_out_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantage: each sample's score minus the mean score of the *other* samples of its prompt.

    Kool et al. 2019; Ahmadian et al. 2024, eq. 5:
    ``A_i = r_i - 1/(G-1) * sum_{j != i} r_j``, an unbiased baseline (it does not
    depend on sample i). Equal to ``G/(G-1) * (r_i - mean(r_group))``.

    Args:
        scores: ``(B,)`` prompt-major, as in :func:`group_advantages`.
        group_size: G >= 2.

    Returns:
        ``(B,)`` advantages (no gradient).
    """
    if group_size < 2 or scores.numel() % group_size:
        raise ValueError(f"group_size must be >= 2 and divide the {scores.numel()} scores, got {group_size}")
    groups = scores.float().view(-1, group_size)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


@torch.no_grad()
def uniform_groups(scores: torch.Tensor, group_size: int, tol: float = 0.0) -> torch.Tensor:
    """``(B / G,)`` bool: groups whose scores are all equal (within ``tol``).

    Their group-relative advantages are all 0: they carry no signal and only
    dilute the batch (DAPO's dynamic sampling, Yu et al. 2025, sec. 3.2, leaves
    them out).
    """
    groups = scores.float().view(-1, group_size)
    return (groups.max(dim=1).values - groups.min(dim=1).values) <= tol


@torch.no_grad()
def gae(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, eq. 16).

        delta_t = r_t + gamma * V_{t+1} * valid_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t           (the value targets, "returns")

    The episode ends at each row's last valid token, so the value after it is
    0 (the sequence is finished: there is nothing left to bootstrap from).
    Made for right-padded rows of different lengths; left padding works too.
    An invalid position inside a row would end the episode there.

    Vectorised over the batch, looping backwards over T. No gradient flows:
    advantages and returns are fixed targets for the update.

    Args:
        values: ``(B, T)`` value estimates V_t from the rollout.
        rewards: ``(B, T)`` per-token rewards (e.g. :func:`kl_shaped_rewards`).
        mask: ``(B, T)``, True = valid token.
        gamma: discount factor.
        lam: GAE lambda (0 -> one-step TD, 1 -> Monte-Carlo).

    Returns:
        ``(advantages, returns)``, both ``(B, T)``, at least float32, 0 at
        invalid positions.
    """
    mask = _bool_mask(mask, values)
    dtype = torch.promote_types(values.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=values.device)
    values = torch.where(mask, values.to(dtype), zero)
    rewards = torch.where(mask, rewards.to(dtype), zero)

    num_steps = values.shape[-1]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # V_{T}: beyond the end, 0
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(num_steps)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # An invalid position contributes nothing and cuts the recursion, so
        # the token before it sees "episode over" (no value, no advantage).
        advantage = torch.where(mask[:, t], advantage, zero)
        advantages[:, t] = advantage
        next_value = values[:, t]  # already 0 where invalid
        next_advantage = advantage
    returns = torch.where(mask, advantages + values, zero)
    return advantages, returns


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] over valid tokens.

    1 means the critic predicts the returns perfectly, 0 no better than their
    mean, negative worse than the mean. NaN when the returns have no variance
    (the ratio is undefined), as in cleanrl.

    Args:
        values, returns, mask: ``(B, T)``.
    """
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0:
        return float("nan")
    return (1 - masked_var(returns - values, mask) / var_returns).item()


# --------------------------------------------------------------------------
# KL coefficient controllers (Ziegler et al. 2019, sec. 2.2)
# --------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient; ``update`` does nothing."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """Kept for interface parity with :class:`AdaptiveKLController`."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Steers the KL coefficient so that the policy's KL tracks a target.

    Ziegler et al. 2019, sec. 2.2:

        e_t      = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_t+1 = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    Too much KL -> the coefficient grows; too little -> it shrinks. The clip
    keeps one noisy batch from moving it more than 20% of n_steps / horizon.

    Args:
        init_kl_coef: the starting coefficient.
        target: the KL (per sequence, in nats) to hold.
        horizon: how many samples the controller takes to close the gap
            (Ziegler et al. use 10,000).
    """

    # The proportional error is clipped to +-MAX_ERROR.
    MAX_ERROR = 0.2

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """Adjust the coefficient after a batch.

        Args:
            current_kl: the measured KL of the batch (mean per-sequence KL).
            n_steps: how many samples (sequences) that batch held.
        """
        proportional_error = float(current_kl) / self.target - 1
        proportional_error = max(-self.MAX_ERROR, min(self.MAX_ERROR, proportional_error))
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        # Only the coefficient is state; target and horizon are configuration.
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
