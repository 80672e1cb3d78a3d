"""The one place that samples from a model.

:func:`generate` batches prompts with left padding and a KV cache (transformers'
``generate``) and returns, for each prompt and each of its ``n`` samples, the
response text, its token ids, whether it ended with EOS and, when sampling from
the full softmax, each token's log-probability under the distribution it was
drawn from. Update code never samples; recipes call this (PPO adds log-probs
on its own layout on top, see :func:`ppo_rollout`).

Sampling from the full softmax goes through :class:`InverseCDFSampler`: one
uniform draw per row against the cumulative distribution. transformers'
``torch.multinomial`` draws an exponential variate for every vocabulary entry,
~50 ms per step for 48 rows x 49k tokens on two CPU cores; the inverse CDF takes
~4 ms (a SmolLM2 batch of 48 x 40 tokens samples ~9% faster) and hands back the
drawn token's log-probability for free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from alignkit.config import GenerationConfig
from alignkit.data.collate import encode_prompt, pad

Messages = list[dict]


@dataclass(frozen=True)
class Generation:
    prompt_index: int
    sample_index: int
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]  # without padding; ends with EOS when finished
    text: str  # decoded response, special tokens removed
    finished: bool  # emitted EOS within max_new_tokens
    # per response token, log-prob under the distribution it was drawn from (softmax(logits / T));
    # None when top-p / top-k truncation or greedy decoding picked the tokens
    logprobs: tuple[float, ...] | None = None


# Generation settings that would change the sampling distribution away from
# softmax(logits / temperature). They are pinned explicitly, because transformers
# fills unset ones from the model's generation_config and its global defaults
# (top_k=50 among them), and PPO's log-probs are those of the full softmax.
_NEUTRAL_SAMPLING = dict(top_k=0, top_p=1.0, typical_p=1.0, min_p=None, epsilon_cutoff=0.0, eta_cutoff=0.0,
                         repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0, min_new_tokens=None,
                         bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None,
                         forced_bos_token_id=None, forced_eos_token_id=None, sequence_bias=None,
                         exponential_decay_length_penalty=None, num_beams=1, num_return_sequences=1)


class InverseCDFSampler(LogitsProcessor):
    """Draws each next token from ``softmax(logits / temperature)`` and records its log-prob.

    Used as the last logits processor of a *greedy* ``generate``: it returns
    scores that are -inf everywhere except at the drawn token, so the argmax
    is the sample. One uniform u per row picks the first token whose cumulative
    probability exceeds u times the total (``right=True``: a token of
    probability 0 is never drawn). Randomness comes from the global torch
    generator of the scores' device, so ``torch.manual_seed`` repeats a run.
    ``logprobs()`` is ``(B, steps)``: column t is the log-prob of token t.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self._steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        cdf = logp.exp().cumsum(dim=-1)
        u = torch.rand(scores.shape[0], 1, device=scores.device) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)
        self._steps.append(logp.gather(-1, token))
        return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)

    def logprobs(self) -> torch.Tensor:
        return torch.cat(self._steps, dim=-1).cpu() if self._steps else torch.zeros(0, 0)


def sampling_kwargs(temperature: float) -> tuple[dict, InverseCDFSampler]:
    """``generate`` keyword arguments that sample from the full ``softmax(logits / temperature)``
    through a fresh :class:`InverseCDFSampler` (returned, to read the log-probs afterwards).

    Every setting that would reshape the distribution is pinned off: transformers
    fills unset ones from the model's generation_config and its global defaults.
    """
    sampler = InverseCDFSampler(temperature)
    kwargs = {**_NEUTRAL_SAMPLING, "do_sample": False, "temperature": None, "top_k": None, "top_p": None,
              "logits_processor": LogitsProcessorList([sampler])}
    return kwargs, sampler


@torch.no_grad()
def generate(model, tokenizer, prompts: list[Messages], gen: GenerationConfig, n: int = 1,
             seed: int | None = None, prompt_ids: list[list[int]] | None = None,
             progress_cb=None) -> list[Generation]:
    """Sample ``n`` responses per prompt; returns prompt-major order (p0s0, p0s1, ...)."""
    if seed is not None:
        torch.manual_seed(seed)
    encoded = prompt_ids if prompt_ids is not None else [encode_prompt(tokenizer, p) for p in prompts]
    jobs = [(i, s) for i in range(len(encoded)) for s in range(n)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    out: list[Generation] = []
    # Sort by prompt length so each batch carries little padding; restore order after.
    order = sorted(range(len(jobs)), key=lambda j: len(encoded[jobs[j][0]]))
    results: dict[int, Generation] = {}
    for start in range(0, len(order), gen.batch_size):
        chunk = order[start:start + gen.batch_size]
        seqs = [encoded[jobs[j][0]] for j in chunk]
        ids = pad(seqs, pad_id, side="left").to(device)
        attn = pad([[1] * len(s) for s in seqs], 0, side="left").to(device)
        kwargs = dict(max_new_tokens=gen.max_new_tokens, pad_token_id=pad_id, eos_token_id=eos)
        sampler = None
        if gen.do_sample and gen.top_p >= 1.0 and gen.top_k == 0:
            extra, sampler = sampling_kwargs(gen.temperature)
            kwargs.update(extra)
        elif gen.do_sample:
            # top_k=0 must be passed as 0: None lets transformers fall back to top_k=50.
            kwargs.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        seq = model.generate(input_ids=ids, attention_mask=attn, **kwargs)
        new = seq[:, ids.shape[1]:].tolist()
        logprobs = sampler.logprobs().tolist() if sampler else None
        for row_index, (j, row) in enumerate(zip(chunk, new)):
            p, s = jobs[j]
            resp = trim_response(row, eos, pad_id)
            finished = bool(resp) and resp[-1] == eos
            text = tokenizer.decode(resp, skip_special_tokens=True).strip()
            lp = tuple(logprobs[row_index][:len(resp)]) if logprobs is not None else None
            results[j] = Generation(p, s, tuple(encoded[p]), tuple(resp), text, finished, lp)
        if progress_cb:
            progress_cb(len(chunk))
    out = [results[j] for j in range(len(jobs))]
    model.train(was_training)
    return out


def trim_response(tokens: list[int], eos: int, pad_id: int) -> list[int]:
    """Cut a generated row after its first EOS (what follows is padding)."""
    out = []
    for t in tokens:
        out.append(t)
        if t == eos:
            break
    return out


# --------------------------------------------------------------------------- PPO rollout
#
# PPO needs more than text: per sampled token, its log-probability under the
# policy that sampled it, under the reference, and the critic's value. The
# layout below is shared by the rollout and the update (forward_responses), so
# the update recomputes log-probs on exactly the tensors the rollout scored:
# same padding, same positions (the "ratio != 1 at step 0" bug comes from
# re-padding between the two).


@dataclass(frozen=True)
class Rollout:
    """N sampled responses with everything PPO's update needs, as aligned tensors.

    ``query_responses`` is ``(N, P + R)``: the prompts left-padded to width
    ``P = context_length``, then the responses right-padded to width R. The
    per-token tensors are ``(N, R)``; column t is response token t, predicted
    from position ``P - 1 + t``. ``mask`` is True on each response's tokens,
    its EOS included (stopping is an action too), and False on padding, which
    holds 0 in ``logprobs``, ``ref_logprobs`` and ``values``. Rows are
    prompt-major: the ``n`` samples of prompt i are rows ``i*n .. i*n+n-1``.
    """

    query_responses: torch.Tensor  # (N, P+R) long
    attention_mask: torch.Tensor  # (N, P+R) long: prompt tokens and response tokens
    position_ids: torch.Tensor  # (N, P+R) long: 0 at each row's first real token
    context_length: int  # P
    responses: torch.Tensor  # (N, R) long, pad after the end
    mask: torch.Tensor  # (N, R) bool
    logprobs: torch.Tensor  # (N, R) float32, under the sampling policy at `temperature`
    ref_logprobs: torch.Tensor  # (N, R) float32, under the reference at `temperature`
    values: torch.Tensor  # (N, R) float32, V(s_t) before token t
    finished: torch.Tensor  # (N,) bool: emitted EOS within max_new_tokens
    prompt_index: torch.Tensor  # (N,) long: which input prompt each row answers
    texts: tuple[str, ...]  # decoded responses, special tokens removed
    temperature: float

    def __len__(self) -> int:
        return self.responses.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """``(N,)`` response lengths in tokens (EOS included)."""
        return self.mask.sum(-1)


def layout(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int):
    """Left-padded prompts + right-padded responses -> (ids, attention, positions, responses, mask, P).

    Validity comes from the lengths, never from comparing tokens with pad_id:
    a policy may sample the pad token as an ordinary token.
    """
    P = max(len(p) for p in prompt_ids)
    R = max(1, max(len(r) for r in response_ids))
    rows, attn, resp, mask = [], [], [], []
    for p, r in zip(prompt_ids, response_ids):
        left, right = P - len(p), R - len(r)
        rows.append([pad_id] * left + list(p) + list(r) + [pad_id] * right)
        attn.append([0] * left + [1] * (len(p) + len(r)) + [0] * right)
        resp.append(list(r) + [pad_id] * right)
        mask.append([True] * len(r) + [False] * right)
    ids, attention = torch.tensor(rows), torch.tensor(attn)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return ids, attention, positions, torch.tensor(resp), torch.tensor(mask), P


def forward_responses(actor_critic, query_responses, attention_mask, position_ids, responses,
                      temperature: float):
    """Log-probs ``(B, R)``, values ``(B, R)`` (or None) and logits ``(B, R, V)`` of the response tokens.

    ``actor_critic(input_ids, attention_mask, position_ids, logits_to_keep)``
    returns the last ``logits_to_keep`` positions' logits and values (values may
    be None: a reference). Positions P-1 .. P+R-2 predict the R response tokens.
    Logits are divided by the sampling temperature before the log-softmax: the
    log-probs are those of the distribution the tokens were drawn from.
    """
    from alignkit.losses import token_logprobs

    keep = responses.shape[1] + 1
    logits, values = actor_critic(query_responses, attention_mask, position_ids, keep)
    logits = logits[:, :-1]
    logprobs = token_logprobs(logits, responses, temperature)
    if values is not None:
        values = values[:, :-1].float()
    return logprobs, values, logits


@torch.no_grad()
def ppo_rollout(actor_critic, tokenizer, prompt_ids: list[list[int]], gen: GenerationConfig, *,
                reference, n: int = 1, forward_batch_size: int = 8) -> Rollout:
    """Sample ``n`` responses per prompt and score every sampled token for PPO.

    Args:
        actor_critic: a module with ``.policy`` (the causal LM that samples) and
            ``actor_critic(ids, attention, positions, logits_to_keep) -> (logits, values)``.
        prompt_ids: token ids of the rendered prompts.
        gen: sampling settings; only ``temperature``, ``max_new_tokens`` and
            ``batch_size`` are used: sampling is always from the full softmax.
        reference: ``reference(ids, attention, positions, logits_to_keep) -> (logits, None)``,
            the frozen reference (with LoRA: the policy with its adapter off).
        n: samples per prompt.
        forward_batch_size: rows per scoring forward pass; use the update's
            micro-batch size so that both run the same batch shape.

    Sampling uses the global torch RNG (seed it, or restore its state, to repeat a run).
    """
    was_training = actor_critic.training
    actor_critic.eval()
    policy = actor_critic.policy
    device = next(policy.parameters()).device
    eos, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    jobs = [p for p in range(len(prompt_ids)) for _ in range(n)]

    # 1. sample: left padding + KV cache, prompt order kept (the RNG stream then
    #    depends only on the prompts and the seed)
    responses: list[list[int]] = []
    for start in range(0, len(jobs), gen.batch_size):
        seqs = [prompt_ids[p] for p in jobs[start:start + gen.batch_size]]
        ids = pad(seqs, pad_id, side="left").to(device)
        attn = pad([[1] * len(s) for s in seqs], 0, side="left").to(device)
        # The sampler's recorded log-probs are not used: they come from the cached, left-padded
        # generation (~1e-5 off), and the update's ratio must start at exactly 1 on this layout.
        kwargs, _ = sampling_kwargs(gen.temperature)
        out = policy.generate(input_ids=ids, attention_mask=attn, max_new_tokens=gen.max_new_tokens,
                              pad_token_id=pad_id, eos_token_id=eos, **kwargs)
        responses += [trim_response(row, eos, pad_id) for row in out[:, ids.shape[1]:].tolist()]

    # 2. one layout for everything that follows (rollout scoring and update)
    ids, attn, pos, resp, mask, P = layout([prompt_ids[p] for p in jobs], responses, pad_id)

    # 3. score the sampled tokens: policy log-probs and values in one forward,
    #    reference log-probs on the same rows with the same shapes
    logprobs, ref_logprobs, values = (torch.zeros(resp.shape) for _ in range(3))
    for start in range(0, len(jobs), forward_batch_size):
        rows = slice(start, start + forward_batch_size)
        batch = (ids[rows].to(device), attn[rows].to(device), pos[rows].to(device), resp[rows].to(device))
        lp, v, _ = forward_responses(actor_critic, *batch, gen.temperature)
        ref_lp, _, _ = forward_responses(reference, *batch, gen.temperature)
        logprobs[rows], ref_logprobs[rows], values[rows] = lp.cpu(), ref_lp.cpu(), v.cpu()
    zero = torch.zeros(())
    logprobs, ref_logprobs, values = (torch.where(mask, x, zero) for x in (logprobs, ref_logprobs, values))

    finished = torch.tensor([bool(r) and r[-1] == eos for r in responses])
    texts = tuple(tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses)
    actor_critic.train(was_training)
    return Rollout(ids, attn, pos, P, resp, mask, logprobs, ref_logprobs, values, finished,
                   torch.tensor(jobs, dtype=torch.long), texts, gen.temperature)
