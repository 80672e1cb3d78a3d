"""Every training loss of alignkit, as pure tensor functions.

Each loss returns ``(loss, metrics)``: ``loss`` is a differentiable scalar
tensor, ``metrics`` a ``dict[str, float]`` of detached values for logging.
Shapes use ``B`` for the batch, ``T`` for tokens and ``V`` for the
vocabulary; ``mask`` is a bool (or 0/1) tensor, True = valid token.

Sequence-level log-probabilities (the ``*_logps`` arguments of the preference
losses, shape ``(B,)``) are sums of token log-probs over the completion; build
them with :func:`token_logprobs` and :func:`sequence_logprobs`.

The three PPO losses use distinct metric keys (``policy_loss``,
``value_loss``, ``entropy``...) so a recipe can merge their dicts.

Token-level losses (:func:`sft_loss`, :func:`ppo_policy_loss`,
:func:`ppo_value_loss`, :func:`entropy_bonus`) average over all valid tokens
of the batch. Under gradient accumulation, pass ``num_tokens`` = the number of
valid tokens in the *whole* accumulated batch: each micro-batch then returns
its sum / num_tokens, and the summed gradients equal one big batch's exactly
(a mean of per-micro-batch means would weight short micro-batches up).

The KL estimators ``kl_k1``, ``kl_k2``, ``kl_k3`` live in
:mod:`alignkit.advantages` (reward shaping needs them) and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from alignkit.advantages import kl_k1, kl_k2, kl_k3, masked_mean, masked_sum

__all__ = [
    "token_logprobs",
    "entropy_from_logits",
    "sequence_logprobs",
    "sft_loss",
    "pairwise_loss",
    "reward_centering_loss",
    "dpo_loss",
    "ipo_loss",
    "simpo_loss",
    "kto_loss",
    "kto_reference_point",
    "ppo_policy_loss",
    "clipped_policy_loss",
    "aggregation_weights",
    "kl_loss",
    "ppo_value_loss",
    "entropy_bonus",
    "kl_k1",
    "kl_k2",
    "kl_k3",
]

Metrics = dict[str, float]

# Logits are processed in pieces of at most this many elements (64 MiB in
# float32), so float32 up-casts and temperature-scaled copies never exist for
# the whole (B, T, V) tensor at once.
_CHUNK_ELEMENTS = 1 << 24


def _item(x: torch.Tensor) -> float:
    return float(x.detach().float().item())


def _token_mean(x: torch.Tensor, mask: torch.Tensor, num_tokens: float | None) -> torch.Tensor:
    """Mean over valid tokens, or sum / ``num_tokens`` under grad accumulation."""
    if num_tokens is None:
        return masked_mean(x, mask)
    return masked_sum(x, mask) / max(float(num_tokens), 1.0)


# --------------------------------------------------------------------------
# Token log-probabilities and entropy from logits
# --------------------------------------------------------------------------


def _chunks(logits: torch.Tensor):
    """``(b, t0, t1)`` pieces of ``(B, T, V)`` logits of at most ``_CHUNK_ELEMENTS`` elements.

    A piece is a view into one batch row (``logits[b, t0:t1]``), which stays a view
    even when the caller passed a slice such as ``logits[:, :-1]``; flattening B and
    T would copy such a slice whole.
    """
    batch, steps, vocab = logits.shape
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for b in range(batch):
        for t0 in range(0, steps, step):
            yield b, t0, min(t0 + step, steps)


def _stat_dtype(logits: torch.Tensor) -> torch.dtype:
    # Softmax statistics in bfloat16/float16 lose too much precision: float32 at least.
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _scaled(chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    chunk = chunk.to(_stat_dtype(chunk))
    return chunk if temperature == 1.0 else chunk / temperature


class _TokenLogprobs(torch.autograd.Function):
    """``z[label] - logsumexp(z)`` with ``z = logits / temperature``, piece by piece, with its own backward.

    Autograd through per-row views of the logits would give each view's backward a
    zero-filled gradient of the *whole* ``(B, T, V)`` tensor (B of them, then summed):
    O(B^2 T V) work that took a fifth of a DPO step. The gradient is written here once,
    piece by piece: d/dz_v [z_y - logsumexp(z)] = 1[v = y] - softmax(z)_v, times 1/temperature.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
        out = logits.new_empty(logits.shape[:2], dtype=_stat_dtype(logits))
        lse = torch.empty_like(out)
        for b, t0, t1 in _chunks(logits):
            z = _scaled(logits[b, t0:t1], temperature)
            lse[b, t0:t1] = torch.logsumexp(z, dim=-1)
            out[b, t0:t1] = z.gather(-1, labels[b, t0:t1].unsqueeze(-1)).squeeze(-1) - lse[b, t0:t1]
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        tau = ctx.temperature
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for b, t0, t1 in _chunks(logits):
            g_out = grad_out[b, t0:t1].to(lse.dtype).unsqueeze(-1)  # (n, 1)
            probs = torch.exp(_scaled(logits[b, t0:t1], tau) - lse[b, t0:t1].unsqueeze(-1))
            g = probs.mul_(-g_out).scatter_add_(-1, labels[b, t0:t1].unsqueeze(-1), g_out)
            grad[b, t0:t1] = g.div_(tau) if tau != 1.0 else g
        return grad, None, None


class _Entropy(torch.autograd.Function):
    """``-sum_v p_v log p_v`` of ``softmax(logits / temperature)``, piece by piece, with its own backward
    (as :class:`_TokenLogprobs`): dH/dz_v = -p_v (log p_v + H), times 1/temperature."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        out = logits.new_empty(logits.shape[:2], dtype=_stat_dtype(logits))
        for b, t0, t1 in _chunks(logits):
            logp = F.log_softmax(_scaled(logits[b, t0:t1], temperature), dim=-1)
            out[b, t0:t1] = -(logp.exp() * logp).sum(dim=-1)
        ctx.save_for_backward(logits, out)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, entropy = ctx.saved_tensors
        tau = ctx.temperature
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for b, t0, t1 in _chunks(logits):
            logp = F.log_softmax(_scaled(logits[b, t0:t1], tau), dim=-1)
            g = logp.exp().mul_(logp.add_(entropy[b, t0:t1].unsqueeze(-1))).mul_(-grad_out[b, t0:t1].to(entropy.dtype).unsqueeze(-1))
            grad[b, t0:t1] = g.div_(tau) if tau != 1.0 else g
        return grad, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each label token: ``log_softmax(logits / temperature)[labels]``.

    Computed as ``z[label] - logsumexp(z)`` piece by piece, never building a
    full ``(B, T, V)`` log-softmax (its backward writes the one ``(B, T, V)``
    gradient the logits need, and nothing else of that size). Sampling at
    temperature tau draws from ``softmax(logits / tau)``; PPO must score tokens
    with the same tau or the importance ratio is wrong from the first step.

    Args:
        logits: ``(B, T, V)``; position t predicts ``labels[:, t]`` (the caller
            shifts: ``logits[:, :-1]`` with ``input_ids[:, 1:]``).
        labels: ``(B, T)`` token ids. Negative ids (e.g. -100 padding) are
            read as id 0; the value there is meaningless and must be masked.
        temperature: sampling temperature, > 0.

    Returns:
        ``(B, T)`` float32 log-probabilities (float64 for float64 logits;
        differentiable w.r.t. logits).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        return logits.new_zeros(logits.shape[:2], dtype=_stat_dtype(logits))
    return _TokenLogprobs.apply(logits, labels.clamp(min=0), float(temperature))


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of each next-token distribution, ``-sum_v p_v log p_v``.

    Args:
        logits: ``(B, T, V)``.
        temperature: the distribution is ``softmax(logits / temperature)``.

    Returns:
        ``(B, T)`` float32 entropies in nats (log V at most).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        return logits.new_zeros(logits.shape[:2], dtype=_stat_dtype(logits))
    return _Entropy.apply(logits, float(temperature))


def sequence_logprobs(logprobs: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per-sequence log-probability: sum (or mean) of token log-probs over valid tokens.

    Args:
        logprobs: ``(B, T)`` token log-probs (:func:`token_logprobs`).
        mask: ``(B, T)``, True = completion token.
        average: divide by the number of valid tokens (length-normalised, as
            SimPO's rewards and IPO's original formulation use).

    Returns:
        ``(B,)``; 0 for a row with no valid token.
    """
    if average:
        return masked_mean(logprobs, mask, dim=-1)
    return masked_sum(logprobs, mask, dim=-1)


# --------------------------------------------------------------------------
# Supervised fine-tuning
# --------------------------------------------------------------------------


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Token-level negative log-likelihood, averaged over all valid tokens.

    Every valid token of the batch weighs the same (not a mean of per-row
    means, which would over-weight short responses).

    Args:
        logits: ``(B, T, V)``, already aligned with ``labels`` (caller shifts).
        labels: ``(B, T)`` target ids.
        mask: ``(B, T)``, True = token to learn (response tokens for SFT).
        num_tokens: for gradient accumulation, the valid-token count of the
            whole accumulated batch (see the module docstring).

    Returns:
        ``(loss, metrics)`` with metrics ``loss`` (this batch's mean NLL),
        ``tokens`` (valid-token count) and ``perplexity`` (exp of the mean NLL).
    """
    nll = -token_logprobs(logits, labels)
    loss = _token_mean(nll, mask, num_tokens)
    mean_nll = masked_mean(nll.detach(), mask)
    metrics = {
        "loss": _item(mean_nll),
        "tokens": _item(mask.bool().sum()),
        "perplexity": _item(mean_nll.exp()),
    }
    return loss, metrics


# --------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------


def pairwise_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Bradley-Terry reward-model loss: mean of ``-log sigmoid(r_c - r_r - m)``.

    Ouyang et al. 2022 (InstructGPT), eq. 1; the margin ``m`` is Llama 2's
    (Touvron et al. 2023, eq. 2): a pair labelled "significantly better" must
    be separated by more. ``logsigmoid`` keeps large gaps finite.

    Args:
        chosen_scores: ``(B,)`` reward-model scores of the preferred completions.
        rejected_scores: ``(B,)`` scores of the other completions.
        margin: ``(B,)`` or a float; None = no margin.

    Returns:
        ``(loss, metrics)`` with metrics ``loss``, ``accuracy`` (share of pairs
        with r_c > r_r strictly: a tie counts as wrong), ``score_margin`` (mean
        r_c - r_r), ``chosen_score`` and ``rejected_score`` (means).
    """
    score_margin = chosen_scores - rejected_scores
    logits = score_margin if margin is None else score_margin - margin
    loss = -F.logsigmoid(logits).mean()
    score_margin = score_margin.detach()
    metrics = {
        "loss": _item(loss),
        "accuracy": _item((score_margin > 0).float().mean()),
        "score_margin": _item(score_margin.mean()),
        "chosen_score": _item(chosen_scores.detach().mean()),
        "rejected_score": _item(rejected_scores.detach().mean()),
    }
    return loss, metrics


def reward_centering_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
) -> tuple[torch.Tensor, Metrics]:
    """Auxiliary penalty that keeps reward-model scores centred on zero.

    Eisenstein et al. 2023 ("Helping or Herding?"), sec. 3: the Bradley-Terry
    loss only sees differences, so scores can drift by any constant; the mean
    of ``(r_c + r_r)^2`` pins them near 0 (the paper weights it by 0.01). The
    recipe multiplies it by its coefficient and adds it to :func:`pairwise_loss`.

    Args:
        chosen_scores, rejected_scores: ``(B,)`` reward-model scores.

    Returns:
        ``(penalty, metrics)`` with metrics ``centering`` (the penalty) and
        ``mean_score`` (mean of all 2B scores).
    """
    penalty = ((chosen_scores + rejected_scores) ** 2).mean()
    mean_score = (chosen_scores.detach().mean() + rejected_scores.detach().mean()) / 2
    return penalty, {"centering": _item(penalty), "mean_score": _item(mean_score)}


# --------------------------------------------------------------------------
# Direct preference optimisation and relatives
# --------------------------------------------------------------------------


def _preference_metrics(
    loss: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> Metrics:
    chosen_rewards = chosen_rewards.detach()
    rejected_rewards = rejected_rewards.detach()
    return {
        "loss": _item(loss),
        "chosen_reward": _item(chosen_rewards.mean()),
        "rejected_reward": _item(rejected_rewards.mean()),
        "reward_accuracy": _item((chosen_rewards > rejected_rewards).float().mean()),
        "reward_margin": _item((chosen_rewards - rejected_rewards).mean()),
    }


def _implicit_rewards(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-ratios log pi/pi_ref of chosen and rejected; the reference is frozen."""
    return (
        policy_chosen_logps - ref_chosen_logps.detach(),
        policy_rejected_logps - ref_rejected_logps.detach(),
    )


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Direct Preference Optimisation (Rafailov et al. 2023, eq. 7).

        h    = (log pi(y_c) - log pi(y_r)) - (log ref(y_c) - log ref(y_r))
        loss = mean[ -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h) ]

    ``label_smoothing`` ls > 0 is conservative DPO (Mitchell 2023): it treats
    each label as flipped with probability ls, so the loss stops pushing once
    the margin is large; ls = 0.5 makes the loss symmetric in h (no signal).
    With policy == reference every pair gives log 2.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` summed token
            log-probs of the completions under the policy.
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` the same under the
            frozen reference (detached here).
        beta: strength of the implicit KL constraint (typically 0.1).
        label_smoothing: ls in [0, 0.5].

    Returns:
        ``(loss, metrics)`` with metrics ``loss``, ``chosen_reward`` and
        ``rejected_reward`` (means of the implicit rewards
        beta * log(pi / ref)), ``reward_accuracy`` (share with chosen reward >
        rejected reward strictly) and ``reward_margin`` (mean difference).
    """
    chosen_log_ratio, rejected_log_ratio = _implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    h = chosen_log_ratio - rejected_log_ratio
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    loss = losses.mean()
    return loss, _preference_metrics(loss, beta * chosen_log_ratio, beta * rejected_log_ratio)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, Metrics]:
    """Identity Preference Optimisation (Azar et al. 2023, sec. 5, the IPO loss).

        loss = mean[ (h - 1 / (2 beta))^2 ]   with h as in :func:`dpo_loss`

    A squared loss regresses the log-ratio gap to a finite target instead of
    pushing it to infinity, so IPO does not overfit deterministic preferences.
    Here beta plays the role of the paper's tau (regularisation strength).
    Many implementations pass length-averaged log-probs
    (``sequence_logprobs(..., average=True)``); summed ones work too but need
    a smaller beta.

    Args and metrics as in :func:`dpo_loss` (rewards are beta * log(pi / ref)).
    """
    chosen_log_ratio, rejected_log_ratio = _implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    h = chosen_log_ratio - rejected_log_ratio
    loss = (h - 1 / (2 * beta)).square().mean()
    return loss, _preference_metrics(loss, beta * chosen_log_ratio, beta * rejected_log_ratio)


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, Metrics]:
    """SimPO: reference-free, length-normalised preference loss (Meng et al. 2024).

        r(y) = beta / |y| * log pi(y)
        loss = mean[ -log sigmoid(r(y_c) - r(y_r) - gamma) ]

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` *summed* token
            log-probs under the policy (the length division happens here).
        chosen_lengths, rejected_lengths: ``(B,)`` completion token counts
            (a length of 0 is read as 1, to avoid dividing by zero).
        beta: reward scale (the paper uses 2.0-2.5).
        gamma: target reward margin (the paper uses 0.5-1.6).

    Returns:
        ``(loss, metrics)`` with the keys of :func:`dpo_loss`; the rewards are
        beta * (average token log-prob).
    """
    chosen_rewards = beta * policy_chosen_logps / chosen_lengths.clamp(min=1)
    rejected_rewards = beta * policy_rejected_logps / rejected_lengths.clamp(min=1)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma).mean()
    return loss, _preference_metrics(loss, chosen_rewards, rejected_rewards)


def kto_reference_point(
    policy_logps_mismatched: torch.Tensor, ref_logps_mismatched: torch.Tensor, sum_over_processes=None
) -> torch.Tensor:
    """KTO's reference point z0 = max(0, mean log(pi / ref)), detached.

    Ethayarajh et al. 2024, sec. 4.1: z0 estimates KL(pi || ref) on
    *mismatched* pairs (each prompt with another example's completion) so it
    does not track the very completions being scored; it is clamped at 0
    because a KL cannot be negative, and no gradient flows through it. Under
    data parallelism the mean is over every process's examples, before clamping.

    Args:
        policy_logps_mismatched, ref_logps_mismatched: ``(B,)`` summed
            log-probs of the mismatched completions.
        sum_over_processes: ``(total, count) -> (total, count)`` summed over the
            processes of a data-parallel run; None in one process.

    Returns:
        A scalar tensor.
    """
    log_ratio = policy_logps_mismatched.detach() - ref_logps_mismatched.detach()
    total, count = log_ratio.sum(), log_ratio.new_tensor(float(log_ratio.numel()))
    if sum_over_processes is not None:
        total, count = sum_over_processes(total, count)
    return (total / count).clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl_ref_point: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """Kahneman-Tversky Optimisation (Ethayarajh et al. 2024, sec. 4.1).

    With r = log pi(y) - log ref(y) and z0 the reference point:

        desirable y:   w_d * (1 - sigmoid(beta * (r - z0)))
        undesirable y: w_u * (1 - sigmoid(beta * (z0 - r)))

    averaged over the whole batch. KTO needs only a thumbs-up / thumbs-down
    per completion, not pairs. The paper suggests weights such that
    w_d * n_desirable / (w_u * n_undesirable) lies in [1, 4/3].

    Args:
        policy_logps: ``(B,)`` summed completion log-probs under the policy.
        ref_logps: ``(B,)`` the same under the frozen reference.
        labels: ``(B,)`` bool, True = desirable.
        kl_ref_point: z0 from :func:`kto_reference_point` (detached scalar).
        beta: the reward scale.
        desirable_weight, undesirable_weight: w_d and w_u.

    Returns:
        ``(loss, metrics)`` with metrics ``loss``, ``desirable_reward`` and
        ``undesirable_reward`` (mean beta * r within each group, 0 if the group
        is empty), ``desirable_count``, ``undesirable_count`` and
        ``kl_ref_point``.
    """
    labels = labels.bool()
    z0 = torch.as_tensor(kl_ref_point, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    log_ratio = policy_logps - ref_logps.detach()
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - z0)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - log_ratio)))
    loss = torch.where(labels, desirable_losses, undesirable_losses).mean()

    rewards = beta * log_ratio.detach()
    metrics = {
        "loss": _item(loss),
        "desirable_reward": _item(masked_mean(rewards, labels)),
        "undesirable_reward": _item(masked_mean(rewards, ~labels)),
        "desirable_count": float(labels.sum().item()),
        "undesirable_count": float((~labels).sum().item()),
        "kl_ref_point": _item(z0),
    }
    return loss, metrics


# --------------------------------------------------------------------------
# PPO (Schulman et al. 2017)
# --------------------------------------------------------------------------


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss.

        ratio    = exp(logprobs - old_logprobs)
        pg_loss1 = -A * ratio
        pg_loss2 = -A * clip(ratio, 1 - eps, 1 + eps)
        loss     = masked mean over all valid tokens of max(pg_loss1, pg_loss2)

    :func:`clipped_policy_loss` with a symmetric clip and ``token`` aggregation.

    Args:
        logprobs: ``(B, T)`` token log-probs under the policy being updated.
        old_logprobs: ``(B, T)`` the same tokens under the rollout policy
            (detached here).
        advantages: ``(B, T)`` (detached here), usually whitened GAE.
        mask: ``(B, T)``, True = generated token.
        clip_eps: eps (typically 0.2).
        num_tokens: for gradient accumulation (see the module docstring).

    Returns:
        ``(loss, metrics)`` as :func:`clipped_policy_loss`.
    """
    mask = mask.bool()
    denominator = float(num_tokens) if num_tokens is not None else float(mask.sum())
    weights = mask.to(logprobs.dtype) / max(denominator, 1.0)
    return clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps, weights)


AGGREGATIONS = ("token", "sequence", "constant")


def aggregation_weights(mask: torch.Tensor, aggregation: str, num_sequences: float, num_tokens: float,
                        max_length: int) -> torch.Tensor:
    """``(B, T)`` per-token weights that turn a per-token loss into the batch loss: ``sum(w * loss)``.

    - ``token`` (DAPO, Yu et al. 2025, eq. 8): the mean over every token of the
      batch, ``1 / num_tokens``: long answers weigh by their length;
    - ``sequence`` (GRPO, Shao et al. 2024, eq. 3): each sequence's token mean,
      then the mean over sequences, ``1 / (len_i * num_sequences)``: a token of a
      short answer weighs more than one of a long answer;
    - ``constant`` (Dr. GRPO, Liu et al. 2025, eq. 4): the token sum over a fixed
      length, ``1 / (max_length * num_sequences)``: no length bias either way.

    ``num_sequences`` and ``num_tokens`` are those of the whole minibatch (every
    micro-batch, every process), so that accumulated gradients equal one big
    batch's; ``len_i`` is row i's own valid-token count.
    """
    mask = mask.bool()
    m = mask.float()
    if aggregation == "token":
        return m / max(num_tokens, 1.0)
    if aggregation == "sequence":
        lengths = m.sum(dim=-1, keepdim=True).clamp(min=1.0)
        return m / (lengths * max(num_sequences, 1.0))
    if aggregation == "constant":
        return m / (max_length * max(num_sequences, 1.0))
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, Metrics]:
    """The clipped surrogate with an asymmetric clip range, summed with per-token ``weights``.

        ratio    = exp(logprobs - old_logprobs)
        pg_loss1 = -A * ratio
        pg_loss2 = -A * clip(ratio, 1 - clip_low, 1 + clip_high)
        loss     = sum over valid tokens of weights * max(pg_loss1, pg_loss2)

    ``clip_high > clip_low`` is DAPO's clip-higher (Yu et al. 2025, sec. 3.1): a
    token with positive advantage may gain more probability before the clip
    stops it, which keeps low-probability tokens from being locked out.

    Args:
        logprobs: ``(B, T)`` token log-probs under the policy being updated.
        old_logprobs: ``(B, T)`` under the rollout policy (detached here).
        advantages: ``(B, T)`` (detached here); a sequence-level advantage is
            the same value on every token of its row.
        mask: ``(B, T)``, True = generated token.
        clip_low, clip_high: eps below and above 1.
        weights: ``(B, T)`` from :func:`aggregation_weights` (0 on padding).

    Returns:
        ``(loss, metrics)``: ``policy_loss`` (this batch's token mean of the
        clipped objective), ``clip_fraction`` (share of valid tokens whose
        clipped term is the active max, so their gradient is 0), ``approx_kl``
        (mean k3 estimate of KL(old || new), >= 0), ``ratio_mean``, ``ratio_max``.
    """
    mask = mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    old_logprobs = old_logprobs.detach()
    # Neutralise padding *before* the arithmetic: a huge padded log-ratio
    # overflows exp() to inf (or an advantage there is NaN), and 0 * inf in the
    # backward pass gives NaN gradients even though the weights mask it out.
    advantages = torch.where(mask, advantages.detach(), zero)
    log_ratio = torch.where(mask, logprobs - old_logprobs, zero)
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    pg_loss = torch.max(pg_loss1, pg_loss2)
    loss = (torch.where(mask, pg_loss, zero) * weights.to(pg_loss.dtype)).sum()

    with torch.no_grad():
        ratio_valid = torch.where(mask, ratio, zero)
        metrics = {
            "policy_loss": _item(masked_mean(pg_loss, mask)),
            "clip_fraction": _item(masked_mean((pg_loss2 > pg_loss1).float(), mask)),
            "approx_kl": _item(masked_mean(kl_k3(old_logprobs, logprobs), mask)),
            "ratio_mean": _item(masked_mean(ratio, mask)),
            "ratio_max": _item(ratio_valid.max()) if ratio_valid.numel() else 0.0,
        }
    return loss, metrics


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
            weights: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """KL to the reference as a loss term (GRPO, Shao et al. 2024, eq. 4): the k3 estimate per token,
    ``exp(ref - logp) - (ref - logp) - 1``, differentiable in ``logprobs``, summed with ``weights``.

    Args:
        logprobs: ``(B, T)`` under the policy being updated (with grad).
        ref_logprobs: ``(B, T)`` under the frozen reference (detached here).
        mask, weights: as :func:`clipped_policy_loss`.

    Returns:
        ``(loss, {"kl_loss": token mean of k3})``; multiply by beta in the recipe.
    """
    mask = mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    k3 = torch.where(mask, kl_k3(logprobs, ref_logprobs.detach()), zero)
    loss = (k3 * weights.to(k3.dtype)).sum()
    return loss, {"kl_loss": _item(masked_mean(k3.detach(), mask))}


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Clipped value loss (the PPO2 baselines form).

        v_clipped = old_v + clip(v - old_v, -eps, eps)
        loss      = 0.5 * masked mean of max((v - R)^2, (v_clipped - R)^2)

    The clip keeps the critic near its rollout-time predictions, like the
    policy's trust region. It often does not help (Andrychowicz et al. 2021,
    "What Matters in On-Policy RL"), so ``clip_eps=None`` turns it off.
    Note that eps is in the units of the returns.

    Args:
        values: ``(B, T)`` current critic predictions.
        old_values: ``(B, T)`` critic predictions at rollout time (detached).
        returns: ``(B, T)`` GAE targets (detached).
        mask: ``(B, T)``, True = generated token.
        clip_eps: eps, or None for the plain squared error.
        num_tokens: for gradient accumulation (see the module docstring).

    Returns:
        ``(loss, metrics)`` with metrics ``value_loss`` (this batch's token
        mean) and ``value_clip_fraction`` (share of valid tokens where the
        clipped error is the larger one, so that token's gradient is 0).
    """
    mask = mask.bool()
    # Padding is neutralised before the arithmetic (see ppo_policy_loss).
    returns = torch.where(mask, returns.detach(), values.detach())
    vf_loss1 = (values - returns).square()
    if clip_eps is None:
        vf_loss = vf_loss1
        clipped = torch.zeros_like(mask)
    else:
        old_values = torch.where(mask, old_values.detach(), values.detach())
        values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        vf_loss2 = (values_clipped - returns).square()
        vf_loss = torch.max(vf_loss1, vf_loss2)
        clipped = vf_loss2 > vf_loss1
    loss = 0.5 * _token_mean(vf_loss, mask, num_tokens)

    with torch.no_grad():
        metrics = {
            "value_loss": _item(0.5 * masked_mean(vf_loss, mask)),
            "value_clip_fraction": _item(masked_mean(clipped.float(), mask)),
        }
    return loss, metrics


def entropy_bonus(
    entropies: torch.Tensor,
    mask: torch.Tensor,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Mean token entropy: a bonus to *maximise*, so the caller subtracts it.

        total_loss = policy_loss + c1 * value_loss - c2 * bonus

    (Schulman et al. 2017, eq. 9.) The sign is left to the caller on purpose:
    the returned value is the entropy itself, readable as such.

    Args:
        entropies: ``(B, T)`` from :func:`entropy_from_logits` (differentiable).
        mask: ``(B, T)``, True = generated token.
        num_tokens: for gradient accumulation (see the module docstring).

    Returns:
        ``(bonus, metrics)`` with metric ``entropy`` (this batch's token mean).
    """
    bonus = _token_mean(entropies, mask, num_tokens)
    return bonus, {"entropy": _item(masked_mean(entropies.detach(), mask))}
