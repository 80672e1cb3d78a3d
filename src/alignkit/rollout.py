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

Each sampled row draws its uniforms from its own stream, seeded by the call's seed
and the row's identity (prompt index, sample index): what a prompt's k-th sample
is depends on the seed alone, not on the batch it was sampled in, the batch size,
or how many processes split the prompts. So N processes sampling their shares of
the prompts produce exactly what one process does, and a resumed run samples what
the uninterrupted one did without restoring any device's RNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import (LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList,
                          TopKLogitsWarper, TopPLogitsWarper)

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
    probability 0 is never drawn). ``uniforms`` ``(B, steps)`` gives row i's
    draw at step t (:func:`row_uniforms`); without it they come from the global
    torch generator of the scores' device. ``top_k`` / ``top_p`` truncate the
    tempered distribution first (transformers' warpers). ``logprobs()`` is
    ``(B, steps)``: column t is the log-prob of token t under the distribution
    it was drawn from.
    """

    def __init__(self, temperature: float, uniforms: torch.Tensor | None = None, top_k: int = 0,
                 top_p: float = 1.0):
        self.temperature = temperature
        self.uniforms = uniforms
        self.warpers = ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
        self._steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scaled = scores.float() / self.temperature
        for warp in self.warpers:
            scaled = warp(input_ids, scaled)
        logp = torch.log_softmax(scaled, dim=-1)
        cdf = logp.exp().cumsum(dim=-1)
        if self.uniforms is not None:
            t = len(self._steps)
            u = self.uniforms[:, t:t + 1].to(cdf.device)
        else:
            u = torch.rand(scores.shape[0], 1, device=scores.device)
        token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=scores.shape[-1] - 1)
        self._steps.append(logp.gather(-1, token))
        return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)

    def logprobs(self) -> torch.Tensor:
        return torch.cat(self._steps, dim=-1).cpu() if self._steps else torch.zeros(0, 0)


def row_uniforms(seed: int, keys: list[tuple[int, ...]], steps: int) -> torch.Tensor:
    """``(len(keys), steps)`` uniforms in [0, 1); row i from a stream seeded by ``(seed, *keys[i])``.

    >>> a = row_uniforms(3, [(0, 0), (0, 1)], 4)
    >>> torch.equal(a[1], row_uniforms(3, [(0, 1)], 4)[0])   # a row's draws do not depend on its batch
    True
    """
    rows = [np.random.default_rng([seed % 2**63, *keys_i]).random(steps, dtype=np.float32) for keys_i in keys]
    return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, steps)


def draw_seed() -> int:
    """A base seed from the global torch generator (so ``torch.manual_seed`` repeats a run)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def sampling_kwargs(temperature: float, uniforms: torch.Tensor | None = None, top_k: int = 0,
                    top_p: float = 1.0) -> tuple[dict, InverseCDFSampler]:
    """``generate`` keyword arguments that sample from ``softmax(logits / temperature)`` (truncated to
    ``top_k`` / ``top_p`` when set) through a fresh :class:`InverseCDFSampler` (returned, to read the
    log-probs afterwards).

    Every other setting that would reshape the distribution is pinned off:
    transformers fills unset ones from the model's generation_config and its
    global defaults.
    """
    sampler = InverseCDFSampler(temperature, uniforms, top_k, top_p)
    kwargs = {**_NEUTRAL_SAMPLING, "do_sample": False, "temperature": None, "top_k": None, "top_p": None,
              "logits_processor": LogitsProcessorList([sampler])}
    return kwargs, sampler


class _StopWhenSet(StoppingCriteria):
    """Ends generation at the next token once ``event`` is set (a server shutting down)."""

    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _sample(model, tokenizer, seqs: list[list[int]], keys: list[tuple[int, ...]], gen: GenerationConfig,
            seed: int, synced: bool = False, max_time: float | None = None,
            stop=None) -> tuple[list[list[int]], list | None]:
    """One batch: ``(responses cut after EOS, per-token log-probs or None)`` for left-padded ``seqs``.

    ``max_time`` (seconds) and ``stop`` (an event) end the generation early: the
    responses are then what was sampled so far (unfinished, without EOS).
    """
    device = next(model.parameters()).device
    eos, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = pad(seqs, pad_id, side="left").to(device)
    attn = pad([[1] * len(s) for s in seqs], 0, side="left").to(device)
    kwargs = dict(max_new_tokens=gen.max_new_tokens, pad_token_id=pad_id, eos_token_id=eos)
    if synced:
        kwargs["synced_gpus"] = True
    if gen.cache == "static":
        kwargs["cache_implementation"] = "static"
    if max_time is not None:
        kwargs["max_time"] = max_time
    if stop is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_StopWhenSet(stop)])
    sampler = None
    if gen.do_sample:
        extra, sampler = sampling_kwargs(gen.temperature, row_uniforms(seed, keys, gen.max_new_tokens),
                                         gen.top_k, gen.top_p)
        kwargs.update(extra)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids=ids, attention_mask=attn, **kwargs)
    responses = [trim_response(row, eos, pad_id) for row in out[:, ids.shape[1]:].tolist()]
    # Log-probs of the full softmax only: under truncation they belong to another distribution.
    full = gen.do_sample and gen.top_k == 0 and gen.top_p >= 1
    logprobs = sampler.logprobs().tolist() if full else None
    return responses, logprobs


@torch.no_grad()
def generate(model, tokenizer, prompts: list[Messages], gen: GenerationConfig, n: int = 1,
             seed: int | None = None, prompt_ids: list[list[int]] | None = None,
             progress_cb=None, engine=None, max_time: float | None = None, stop=None) -> list[Generation]:
    """Sample ``n`` responses per prompt; returns prompt-major order (p0s0, p0s1, ...).

    ``seed`` fixes every draw (see the module docstring); None takes one from the
    global torch generator. With an ``engine`` of several processes each samples
    its share of the prompts and every process gets all results, in order: the
    same list as one process gives. ``max_time`` (seconds, per batch) and
    ``stop`` (an event) end sampling early, as a server needs.
    """
    from alignkit.training import SingleProcess

    engine = engine or SingleProcess()
    seed = draw_seed() if seed is None else seed
    encoded = prompt_ids if prompt_ids is not None else [encode_prompt(tokenizer, p) for p in prompts]
    check_context(model, encoded, gen.max_new_tokens)
    mine = engine.shard(list(range(len(encoded))))
    jobs = [(i, s) for i in mine for s in range(n)]
    was_training = model.training
    model.eval()
    # Sort by prompt length so each batch carries little padding; restore order after.
    order = sorted(range(len(jobs)), key=lambda j: len(encoded[jobs[j][0]]))
    results: dict[int, Generation] = {}
    eos = tokenizer.eos_token_id
    with engine.for_generation(model) as sampler_model, engine.autocast():
        for start in range(0, len(order), gen.batch_size):
            chunk = order[start:start + gen.batch_size]
            responses, logprobs = _sample(sampler_model, tokenizer, [encoded[jobs[j][0]] for j in chunk],
                                          [jobs[j] for j in chunk], gen, seed, engine.synced_generation,
                                          max_time, stop)
            for row, (j, resp) in enumerate(zip(chunk, responses)):
                p, s = jobs[j]
                finished = bool(resp) and resp[-1] == eos
                text = tokenizer.decode(resp, skip_special_tokens=True).strip()
                lp = tuple(logprobs[row][:len(resp)]) if logprobs is not None else None
                results[j] = Generation(p, s, tuple(encoded[p]), tuple(resp), text, finished, lp)
            if progress_cb:
                progress_cb(len(chunk) * engine.num_processes)
    model.train(was_training)
    return engine.gather([results[j] for j in range(len(jobs))])


def check_context(model, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
    """Refuse work that cannot fit the model's positions (stages check first, naming file and line)."""
    from alignkit.errors import AlignkitError
    from alignkit.models import model_context

    context = model_context(model)
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]), default=None)
    if context is not None and longest is not None and len(prompt_ids[longest]) + max_new_tokens > context:
        raise AlignkitError(f"prompt {longest} is {len(prompt_ids[longest])} tokens: with up to {max_new_tokens} "
                            f"new tokens it does not fit the model's context of {context} tokens")


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
                reference, n: int = 1, forward_batch_size: int = 8, seed: int | None = None,
                engine=None) -> Rollout:
    """Sample ``n`` responses per prompt and score every sampled token for PPO.

    Args:
        actor_critic: an :class:`~alignkit.actor_critic.ActorCritic` (prepared by the
            engine or not): ``.policy`` samples, and
            ``actor_critic(ids, attention, positions, logits_to_keep) -> (logits, values)``;
            without a critic the rollout's values are 0 (GRPO, RLOO, ...).
        prompt_ids: token ids of the rendered prompts (all processes' prompts).
        gen: sampling settings; only ``temperature``, ``max_new_tokens`` and
            ``batch_size`` are used: sampling is always from the full softmax.
        reference: ``reference(ids, attention, positions, logits_to_keep) -> (logits, None)``,
            the frozen reference (with LoRA: the policy with its adapter off).
        n: samples per prompt.
        forward_batch_size: rows per scoring forward pass; use the update's
            micro-batch size so that both run the same batch shape.
        seed: fixes every draw (row i's stream is seeded by the seed and its
            prompt and sample index); None draws one from the global torch generator.
        engine: with several processes each samples and scores its contiguous
            share of the prompts, and every process gets the whole rollout, laid
            out exactly as one process would lay it out.
    """
    from alignkit.training import SingleProcess

    engine = engine or SingleProcess()
    seed = draw_seed() if seed is None else seed
    was_training = actor_critic.training
    actor_critic.eval()
    eos, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    check_context(engine.unwrap(actor_critic).policy, prompt_ids, gen.max_new_tokens)
    jobs = [(p, s) for p in range(len(prompt_ids)) for s in range(n)]
    my_prompts = set(engine.shard(list(range(len(prompt_ids)))))
    mine = [j for j, (p, _) in enumerate(jobs) if p in my_prompts]

    # 1. sample this process's share: left padding + KV cache, in prompt order
    # The sampler's recorded log-probs are not used: they come from the cached, left-padded
    # generation (~1e-5 off), and the update's ratio must start at exactly 1 on this layout.
    responses: list[list[int]] = []
    gen = GenerationConfig(max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, batch_size=gen.batch_size)
    # in the precision the policy trains in (mixed precision autocasts the forwards)
    with engine.for_generation(actor_critic) as inner, engine.autocast():
        for start in range(0, len(mine), gen.batch_size):
            chunk = [jobs[j] for j in mine[start:start + gen.batch_size]]
            out, _ = _sample(inner.policy, tokenizer, [prompt_ids[p] for p, _ in chunk], chunk, gen, seed,
                             engine.synced_generation)
            responses += out
    responses = engine.gather(responses)

    # 2. one layout for everything that follows (rollout scoring and update), the same on every process
    ids, attn, pos, resp, mask, P = layout([prompt_ids[p] for p, _ in jobs], responses, pad_id)

    # 3. score this process's rows: policy log-probs and values in one forward,
    #    reference log-probs on the same rows with the same shapes
    scorer = engine.unwrap(actor_critic)
    device = next(scorer.parameters()).device
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for start in range(0, len(mine), forward_batch_size):
        sel = torch.tensor(mine[start:start + forward_batch_size])
        batch = (ids[sel].to(device), attn[sel].to(device), pos[sel].to(device), resp[sel].to(device))
        lp, v, _ = forward_responses(scorer, *batch, gen.temperature)
        ref_lp, _, _ = forward_responses(reference, *batch, gen.temperature)
        v = torch.zeros_like(lp) if v is None else v  # a critic-free policy: values are 0
        rows += list(zip(lp.float().cpu(), ref_lp.float().cpu(), v.float().cpu()))
    rows = engine.gather(rows)
    logprobs, ref_logprobs, values = (torch.stack([r[k] for r in rows]) if rows else torch.zeros(resp.shape)
                                      for k in range(3))
    zero = torch.zeros(())
    logprobs, ref_logprobs, values = (torch.where(mask, x, zero) for x in (logprobs, ref_logprobs, values))

    finished = torch.tensor([bool(r) and r[-1] == eos for r in responses])
    texts = tuple(tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses)
    actor_critic.train(was_training)
    return Rollout(ids, attn, pos, P, resp, mask, logprobs, ref_logprobs, values, finished,
                   torch.tensor([p for p, _ in jobs], dtype=torch.long), texts, gen.temperature)
