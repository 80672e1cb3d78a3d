"""The one place that samples from a model.

:func:`generate` batches prompts with left padding and a KV cache (transformers'
``generate``) and returns, for each prompt and each of its ``n`` samples, the
response text, its token ids, whether it ended with EOS and, when sampling from
the full softmax, each token's log-probability under the distribution it was
drawn from. Update code never samples; recipes call this (PPO adds log-probs
on its own layout on top, see :func:`ppo_rollout`).

Sampling runs alignkit's own decoding loop (:func:`decode`) over the model's
forward and a transformers KV cache, not ``model.generate``: a row that has
emitted EOS leaves the batch (with the dynamic cache, whose rows can be dropped),
so a batch costs what its live rows cost, and each step draws straight from the
tempered softmax by the inverse CDF: one uniform per row against the cumulative
distribution, which hands back the drawn token's log-probability for free.
transformers' sampler draws an exponential variate for every vocabulary entry and
runs its logits processors over full-vocabulary copies: with SmolLM2's 49k
vocabulary, a third of a decoding step on two CPU cores.

Each sampled row draws its uniforms from its own stream, seeded by the call's seed
and the row's identity (prompt index, sample index): what a prompt's k-th sample
is depends on the seed alone, not on the batch it was sampled in, the batch size,
or how many processes split the prompts. So N processes sampling their shares of
the prompts produce exactly what one process does, and a resumed run samples what
the uninterrupted one did without restoring any device's RNG.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import TopKLogitsWarper, TopPLogitsWarper

from alignkit.config import GenerationConfig
from alignkit.data.collate import encode_prompt, pad
from alignkit.errors import NonFiniteError
from alignkit.shared_prefix import cache_rows, can_share_prefixes

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


def draw(logits: torch.Tensor, temperature: float, uniforms: torch.Tensor | None = None, warpers=()):
    """One token per row from ``softmax(logits / temperature)``: ``(tokens (B,), log-probs (B,))``.

    ``uniforms`` ``(B,)`` in [0, 1) pick, for row i, the first token whose
    cumulative probability exceeds ``u_i`` times the total (``right=True``: a token
    of probability 0 is never drawn); without them they come from the global torch
    generator of the logits' device. ``warpers`` (transformers' top-k / top-p) truncate
    the tempered distribution first. The log-prob is the drawn token's under the
    distribution it was drawn from, computed in float32 whatever the logits' dtype.
    """
    z = logits.float() / temperature if temperature != 1 else logits.float()  # nothing below writes into z
    for warp in warpers:
        z = warp(None, z)
    top = z.amax(-1, keepdim=True)
    cdf = torch.sub(z, top).exp_().cumsum_(-1)
    total = cdf[:, -1:]
    u = torch.rand(z.shape[0], 1, device=z.device) if uniforms is None else uniforms.to(z.device).view(-1, 1)
    token = torch.searchsorted(cdf, u * total, right=True).clamp_(max=z.shape[-1] - 1)
    logprob = z.gather(-1, token) - top - total.log()
    return token[:, 0], logprob[:, 0]


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


_SAMPLER_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@torch.no_grad()
def sampler_model(model, gen: GenerationConfig, engine=None):
    """The model to sample from: ``model`` itself, or with ``gen.dtype`` set, a copy of it in that precision.

    The copy is made once per model and its weights are copied in from ``model``
    at every call (about a tenth of a second for 135M weights on two CPU cores),
    so it always samples the current policy. A LoRA policy's copy is a plain model
    with the adapter merged into its weights (``W + B A s``, recomputed at every
    sync): unmerged, the adapter's small matmuls in every layer cost what the half
    precision saves (SmolLM2, batch 16 x 40 tokens: 4.6 s unmerged in bf16, 3.4 s
    merged). Sampling from a half-precision copy is what vLLM-backed trainers do;
    the rollout measures how far the copy's log-probs are from the trainer's
    (:func:`sampler_mismatch`).
    """
    if gen.dtype == "auto" or next(model.parameters()).dtype == getattr(torch, gen.dtype):
        return model
    if engine is not None and getattr(engine, "sharded", False):
        from alignkit.errors import ConfigError

        raise ConfigError("generation.dtype: a half-precision sampler copy needs whole weights on each process; "
                          "with FSDP or DeepSpeed ZeRO-3 keep generation.dtype=auto")
    from alignkit.models import is_peft

    dtype = getattr(torch, gen.dtype)
    twin = _SAMPLER_COPIES.get(model)
    if twin is None:
        # copied in its precision from the start (the weights only: buffers such as RoPE frequencies stay
        # as they are); deep-copying first would hold a whole fp32 copy for a moment, which a CPU's
        # allocator may keep (540 MB for SmolLM2, where the bf16 copy is 270 MB)
        memo = {id(p): torch.nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False)
                for p in model.parameters() if p.is_floating_point()}
        twin = copy.deepcopy(model, memo)
        twin = twin.merge_and_unload() if is_peft(twin) else twin
        twin = _SAMPLER_COPIES[model] = twin.eval().requires_grad_(False)
    _sync_weights(twin, model)
    return twin


def _sync_weights(twin, model) -> None:
    """Copy ``model``'s weights into its plain ``twin``, one tensor at a time (no second whole copy at any
    moment); a LoRA model's adapted layers as their merged ``W + B A s``, computed in the trainer's
    precision."""
    from alignkit.models import is_peft

    inner = model.base_model.model if is_peft(model) else model
    source = dict(inner.named_parameters())
    adapted = {}
    if is_peft(model):
        from peft.tuners.lora import LoraLayer

        adapted = {f"{name}.weight": m for name, m in inner.named_modules() if isinstance(m, LoraLayer)}
    for name, param in twin.named_parameters():
        layer = adapted.get(name)
        if layer is None:
            param.copy_(source[name])
        else:
            param.copy_(sum((layer.get_delta_weight(a) for a in layer.active_adapters), layer.base_layer.weight))


def sampler_mismatch(rollout: "Rollout") -> dict[str, float]:
    """How far the sampler's recorded log-probs are from the trainer's on the same tokens.

    ``sampler/logprob_gap``: mean absolute difference per response token;
    ``sampler/kl``: the k3 estimate of KL(sampler || trainer) per token
    (``r - 1 - log r`` with ``r = p_trainer / p_sampler``, on the sampler's tokens).
    Both are ~1e-6 when the sampler runs in the trainer's precision; a half-precision
    sampler shows its rounding here.
    """
    if rollout.sampler_logprobs is None:
        return {}
    mask = rollout.mask
    n = mask.sum().clamp(min=1)
    delta = (rollout.logprobs - rollout.sampler_logprobs).masked_fill(~mask, 0)
    k3 = (delta.exp() - 1 - delta).masked_fill(~mask, 0)
    return {"sampler/logprob_gap": (delta.abs().sum() / n).item(), "sampler/kl": (k3.sum() / n).item()}


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled_step(model):
    """``model``'s forward compiled for decoding steps of fixed shapes (a static cache), once per model.

    CUDA graphs replay the whole step ("reduce-overhead"), as transformers' own
    ``generate`` does with a static cache: a decoding step is mostly launch overhead
    for a model of this size.
    """
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model, mode="reduce-overhead", dynamic=False)
    return _COMPILED[model]


def cache_kwarg(model) -> str:
    """The keyword a model's forward takes its KV cache by: ``cache`` in newer transformers,
    ``past_key_values`` in older ones (there ``cache=`` would vanish into ``**kwargs`` and every
    step would see its one new token without the context)."""
    base = model
    while True:  # through PEFT's and DDP's wrappers to the transformers model
        if hasattr(base, "get_base_model"):
            base = base.get_base_model()
        elif isinstance(getattr(base, "module", None), torch.nn.Module):
            base = base.module
        else:
            break
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


# A static cache's prompt columns are rounded up to a multiple of this (more left padding, masked):
# rollouts whose longest prompts differ then share shapes, and a compiled step compiles once per
# bucket instead of once per rollout.
STATIC_BUCKET = 64
_STATIC_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def static_cache(model, batch: int, length: int, device: torch.device):
    """A static KV cache of ``length`` positions for ``model``; on CUDA one per (batch, length), reset and
    reused: the compiled step's CUDA graphs are recorded for its tensors' addresses."""
    from transformers import StaticCache

    if device.type != "cuda":
        return StaticCache(config=model.config, max_cache_len=length)
    caches = _STATIC_CACHES.setdefault(model, {})
    if (batch, length) in caches:
        caches[batch, length].reset()
    else:
        caches[batch, length] = StaticCache(config=model.config, max_cache_len=length)
    return caches[batch, length]


@torch.no_grad()
def decode(model, ids: torch.Tensor, attention: torch.Tensor, gen: GenerationConfig, eos: int | None,
           uniforms: torch.Tensor | None = None, every_step: bool = False, max_time: float | None = None,
           stop=None, value_head=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sample up to ``gen.max_new_tokens`` tokens after left-padded ``ids``: ``(tokens, log-probs, values)``,
    each ``(B, steps run)``; values are None without a ``value_head``.

    Greedy when ``gen.do_sample`` is off, else :func:`draw` with row i's uniform
    for step t at ``uniforms[i, t]``. A row is done at its EOS; what follows it in
    ``tokens`` is filler. Once every row is done the loop ends, and with the dynamic
    cache done rows leave the batch, so the cost follows the live rows; rows that
    repeat a prompt share its prefill (GRPO's samples of a prompt: 16 rows of 4
    SmolLM2 prompts prefill in 0.33 s instead of 1.13 s on 2 CPU cores).
    ``every_step`` runs all steps on the whole batch (processes whose sharded
    weights gather in each forward must all run the same forwards). A static cache
    runs on prompts left-padded to a multiple of ``STATIC_BUCKET`` columns. ``max_time``
    (seconds) and ``stop`` (an event) end it early: the columns are then the steps
    run so far. ``value_head`` (a linear layer on the model's last hidden state, PPO's critic
    on the policy's trunk) is read at every step from the LM head's input: column t is
    V(s_t), the value of the state token t is drawn from, as a forward of the whole
    sequence gives it (eager steps only: not with a static cache).
    """
    import time

    from transformers import DynamicCache

    static = gen.cache == "static"
    if static and ids.shape[1] % STATIC_BUCKET:
        extra = STATIC_BUCKET - ids.shape[1] % STATIC_BUCKET
        ids, attention = F.pad(ids, (extra, 0), value=0), F.pad(attention, (extra, 0), value=0)
    B, P = ids.shape
    steps, device = gen.max_new_tokens, ids.device
    warpers = ([TopKLogitsWarper(gen.top_k)] if gen.top_k else []) + ([TopPLogitsWarper(gen.top_p)]
                                                                      if gen.top_p < 1 else [])
    cache = static_cache(model, B, P + steps, device) if static else DynamicCache(config=model.config)
    cache_arg = cache_kwarg(model)
    mask = torch.zeros(B, P + steps, dtype=attention.dtype, device=device)
    mask[:, :P] = attention
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    tokens = torch.zeros(B, steps, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, steps, device=device)
    values = None if value_head is None else torch.zeros(B, steps, device=device)
    if value_head is not None and static:
        raise ValueError("decode: value_head needs eager decoding steps; a static cache compiles them")
    # the value head reads what the LM head reads: the last position's final hidden state (logits_to_keep=1),
    # taken from the LM head's input rather than every layer's hidden states (output_hidden_states)
    last_hidden: dict[str, torch.Tensor] = {}
    hook = None if value_head is None else model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: last_hidden.__setitem__("h", args[0][:, -1]))
    done = torch.zeros(B, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)  # which input row each live row is
    inputs, width, ran = ids, P, 0
    deadline = None if max_time is None else time.monotonic() + max_time
    # on a CPU the compiled step is no faster (measured) and compiling takes most of a minute
    step = compiled_step(model) if static and device.type == "cuda" else model
    # rows with the same prompt (GRPO's samples of one prompt) share one prefill, whose cache rows are
    # then copied: row i's prefill is row shared[i] of the distinct prompts' (a dynamic cache only)
    shared = None if static else _shared_prompts(ids, attention)
    try:
        for t in range(steps):
            if t == 0 and shared is not None:
                distinct, copies = shared
                logits = model(input_ids=ids[distinct], attention_mask=mask[distinct, :width],
                               position_ids=positions[distinct], use_cache=True, logits_to_keep=1,
                               **{cache_arg: cache}).logits[:, -1][copies]
                cache.batch_select_indices(copies)
            else:  # a static cache takes the whole-width mask: every decoding step has the same shapes
                copies = slice(None)
                logits = (step if t else model)(input_ids=inputs, attention_mask=mask if static else mask[:, :width],
                                                position_ids=positions, use_cache=True, logits_to_keep=1,
                                                **{cache_arg: cache}).logits[:, -1]
            if value_head is not None:
                last = last_hidden.pop("h")[copies]
                values[rows, t] = value_head(last.to(value_head.weight.dtype)).squeeze(-1).float()
            if gen.do_sample:
                token, logprob = draw(logits, gen.temperature, None if uniforms is None else uniforms[rows.cpu(), t],
                                      warpers)
                logprobs[rows, t] = logprob
            else:
                token = logits.argmax(-1)
            finite = torch.isfinite(logprob if gen.do_sample else logits.amax(-1))  # amax: NaN if a logit is
            if not bool(finite.all()):
                _not_finite(model, rows[~finite], t)
            tokens[rows, t] = token
            ran = t + 1
            if (deadline is not None and time.monotonic() > deadline) or (stop is not None and stop.is_set()):
                break
            if eos is not None and not every_step:
                done[rows] |= token == eos
                live = ~done[rows]
                if not live.any():
                    break
                if not static and not live.all():
                    keep = live.nonzero()[:, 0]
                    cache.batch_select_indices(keep)
                    rows, token, mask, positions = rows[keep], token[keep], mask[keep], positions[keep]
            mask[:, width] = 1
            inputs, positions, width = token[:, None], positions[:, -1:] + 1, width + 1
    finally:
        if hook is not None:
            hook.remove()
    return tokens[:, :ran], logprobs[:, :ran], None if values is None else values[:, :ran]


def _shared_prompts(ids: torch.Tensor, attention: torch.Tensor):
    """``(distinct rows, each row's index among them)`` when some rows repeat a prompt, else None."""
    if len(ids) < 2:
        return None
    _, inverse = torch.unique(torch.cat([ids, attention], 1), dim=0, return_inverse=True)
    n = int(inverse.max()) + 1
    if n == len(ids):
        return None
    first = torch.full((n,), len(ids), device=ids.device).scatter_reduce_(
        0, inverse, torch.arange(len(ids), device=ids.device), reduce="amin")  # each prompt's first row
    return first, inverse


def _not_finite(model, rows: torch.Tensor, step: int):
    """Stop a rollout whose next-token distribution is NaN or inf: a token drawn from it is noise, and
    training on it would report a run that learned nothing (or corrupt the weights)."""
    dtype = next(model.parameters()).dtype
    hint = (" (the sampler's float16 copy overflows: generation.dtype=bfloat16 or auto)" if dtype == torch.float16
            else " (NaN or inf in the weights or activations: a diverged update, or a bad checkpoint)")
    raise NonFiniteError(f"sampling: the model's next-token distribution is not finite at new token {step + 1} "
                         f"of row(s) {rows.tolist()[:8]}{hint}")


def _sample(model, tokenizer, seqs: list[list[int]], keys: list[tuple[int, ...]], gen: GenerationConfig,
            seed: int, synced: bool = False, max_time: float | None = None,
            stop=None, value_head=None) -> tuple[list[list[int]], list | None, list | None]:
    """One batch: ``(responses cut after EOS, per-token log-probs or None, per-token values or None)`` for
    left-padded ``seqs``; values with a ``value_head`` only (see :func:`decode`).

    ``max_time`` (seconds) and ``stop`` (an event) end the generation early: the
    responses are then what was sampled so far (unfinished, without EOS).
    """
    device = next(model.parameters()).device
    eos, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = pad(seqs, pad_id, side="left").to(device)
    attn = pad([[1] * len(s) for s in seqs], 0, side="left").to(device)
    uniforms = row_uniforms(seed, keys, gen.max_new_tokens) if gen.do_sample else None
    tokens, logprobs, values = decode(model, ids, attn, gen, eos, uniforms, every_step=synced, max_time=max_time,
                                      stop=stop, value_head=value_head)
    responses = [trim_response(row, eos, pad_id) for row in tokens.tolist()]
    # Log-probs of the full softmax only: under truncation they belong to another distribution.
    full = gen.do_sample and gen.top_k == 0 and gen.top_p >= 1
    logprobs = logprobs.cpu().tolist() if full else None
    return responses, logprobs, None if values is None else values.cpu().tolist()


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
    # together: a non-finite distribution in one process's share stops every process with the error,
    # rather than leaving the others waiting for its results in the gather below
    with engine.together(), engine.for_generation(model) as inner, engine.autocast():
        sampler = sampler_model(inner, gen, engine)
        for start in range(0, len(order), gen.batch_size):
            chunk = order[start:start + gen.batch_size]
            responses, logprobs, _ = _sample(sampler, tokenizer, [encoded[jobs[j][0]] for j in chunk],
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
    # (N, R) the sampler's own log-probs of the tokens it drew (a half-precision sampler's differ
    # from `logprobs`); only measured, see sampler_mismatch
    sampler_logprobs: torch.Tensor | None = None

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
    """Log-probs ``(B, R)``, values ``(B, R)`` (or None) and logits ``(B, R', V)`` of the response tokens.

    ``actor_critic(input_ids, attention_mask, position_ids, logits_to_keep)``
    returns the last ``logits_to_keep`` positions' logits and values (values may
    be None: a reference; logits may be None, and then the log-probs too: a value
    model alone). Positions P-1 .. P+R-2 predict the R response tokens. Logits are
    divided by the sampling temperature before the log-softmax: the log-probs are
    those of the distribution the tokens were drawn from.

    The forward runs only on the columns some row of this batch uses: prompt
    padding every row has and response columns past the batch's longest response
    are cut (the values do not change: positions are explicit and padding is
    masked). Log-probs and values come back at the full width R, 0 past the
    batch's longest response R'; the logits cover the first R' columns only.
    """
    from alignkit.losses import token_logprobs

    P, R = query_responses.shape[1] - responses.shape[1], responses.shape[1]
    used = attention_mask.bool()
    first = min(int(used[:, :P].any(0).float().argmax()), P - 1)  # the first prompt column a row uses
    width = max(1, int(used[:, P:].sum(-1).max()))  # the longest response of the batch
    keep = width + 1
    cut = slice(first, P + width)
    logits, values = actor_critic(query_responses[:, cut], attention_mask[:, cut], position_ids[:, cut], keep)
    logprobs = None
    if logits is not None:  # None: a value model alone (see ppo_rollout)
        logits = logits[:, :-1]
        logprobs = F.pad(token_logprobs(logits, responses[:, :width], temperature), (0, R - width))
    if values is not None:
        values = F.pad(values[:, :-1].float(), (0, R - width))
    return logprobs, values, logits


def shares_prompts(policy, n: int) -> bool:
    """Whether the ``n`` answers to each prompt can run that prompt once (:func:`forward_shared_prompts`):
    several answers, a causal policy, no gradient checkpointing."""
    return n > 1 and can_share_prefixes(policy)


def forward_shared_prompts(fn, query_responses, attention_mask, position_ids, responses, temperature: float):
    """:func:`forward_responses` of a critic-free ``fn`` with each distinct prompt of the rows run once.

    The prompts but their last token run together, left-padded, for their KV cache; then
    every row runs its prompt's last token and its response after it, on a copy of that
    prompt's rows of the cache, at the positions that go on from it. Gradients flow through
    the cache into the prompts' forward, so log-probs and gradients are those of
    :func:`forward_responses`, to float rounding. With G answers per prompt (GRPO, RLOO,
    online DPO's pairs) the prompt, often half of a row, runs once instead of G times. (The
    logits all come from the second forward, whole: a one-column slice of the prompts'
    would reach the LM head by another matmul path for weights that train than for frozen
    ones, and round differently, so that a policy equal to its reference would not score
    exactly as it.) Rows whose prompt is a single token run whole, with
    ``position_ids``. Returns ``(logprobs (B, R), None, logits (B, R', V))``.
    """
    from transformers import DynamicCache

    from alignkit.losses import token_logprobs

    P, R = query_responses.shape[1] - responses.shape[1], responses.shape[1]
    used = attention_mask[:, :P].bool()
    if int(used.sum(-1).min()) < 2:
        return forward_responses(fn, query_responses, attention_mask, position_ids, responses, temperature)
    distinct: dict[tuple, int] = {}
    owner = [distinct.setdefault(tuple(row[keep].tolist()), len(distinct))
             for row, keep in zip(query_responses[:, :P], used)]
    device = query_responses.device
    p_attn = pad([[1] * (len(p) - 1) for p in distinct], 0, side="left").to(device)
    p_ids = pad([list(p[:-1]) for p in distinct], 0, side="left").to(device)
    cache = DynamicCache()
    fn(p_ids, p_attn, (p_attn.cumsum(-1) - 1).clamp(min=0), 1, cache=cache)
    mine = torch.tensor(owner, device=device)
    width = max(1, int(attention_mask[:, P:].sum(-1).max()))  # the longest response of the batch
    ids = torch.cat([query_responses[:, P - 1:P], responses[:, :width]], dim=1)  # each prompt's last token first
    attention = torch.cat([p_attn[mine], attention_mask[:, P - 1:P + width]], dim=1)
    positions = p_attn.sum(-1)[mine][:, None] + torch.arange(width + 1, device=device)
    logits, _ = fn(ids, attention, positions, width + 1, cache=cache_rows(cache, mine))
    logits = logits[:, :-1]  # column t predicts response token t
    logprobs = F.pad(token_logprobs(logits, responses[:, :width], temperature), (0, R - width))
    return logprobs, None, logits


def scores_while_sampling(actor_critic, sampler, engine) -> bool:
    """Whether the sampling pass gives the rollout's policy log-probs (and a value head's values) itself,
    with no scoring forward of the policy (a third of PPO's rollout with a LoRA policy on 2 CPU cores).

    The sampler records each drawn token's log-prob and, with the critic a head on the
    policy's trunk, reads the head at every step (:func:`decode`); a separate value
    model runs its own forward, alone. When the sampler is the policy itself, in
    float32 without autocast and with whole weights, these are a forward's to float
    rounding (~1e-6: a KV cache sums in another order). A half-precision sampler or
    autocast keep the forward. So do critic-free policies: their advantages are
    normalised per group, and where a prompt's scores are equal the rounding between
    the sampler's log-probs and the reference's forward would become a whole step in
    the KL-shaped rewards. (A static cache, whose decoding steps are compiled, keeps it
    too: see :func:`ppo_rollout`.)
    """
    policy = actor_critic.policy
    return (actor_critic.has_critic and sampler is policy and next(policy.parameters()).dtype == torch.float32
            and engine.mixed_precision == "no" and not getattr(engine, "sharded", False))


def _value_model_alone(value_model):
    """A separate value model as ``(ids, attention, positions, keep) -> (None, values)`` for
    :func:`forward_responses`."""
    from alignkit.actor_critic import token_values

    return lambda ids, attention, positions, keep: (None, token_values(value_model, ids, attention, positions, keep))


@torch.no_grad()
def ppo_rollout(actor_critic, tokenizer, prompt_ids: list[list[int]], gen: GenerationConfig, *,
                reference, n: int = 1, forward_batch_size: int = 8, seed: int | None = None,
                engine=None, score_policy: bool = True) -> Rollout:
    """Sample ``n`` responses per prompt and score every sampled token for PPO.

    Args:
        actor_critic: an :class:`~alignkit.actor_critic.ActorCritic` (prepared by the
            engine or not): ``.policy`` samples, and
            ``actor_critic(ids, attention, positions, logits_to_keep) -> (logits, values)``;
            without a critic the rollout's values are 0 (GRPO, RLOO, ...).
        prompt_ids: token ids of the rendered prompts (all processes' prompts).
        gen: sampling settings; sampling is always from the full softmax (top-k and
            top-p are ignored).
        reference: ``reference(ids, attention, positions, logits_to_keep) -> (logits, None)``,
            the frozen reference (with LoRA: the policy with its adapter off).
        n: samples per prompt.
        forward_batch_size: rows per scoring forward pass, shortest rows together;
            use the update's (see :func:`alignkit.training.forward_rows`).
        seed: fixes every draw (row i's stream is seeded by the seed and its
            prompt and sample index); None draws one from the global torch generator.
        engine: with several processes each samples and scores its contiguous
            share of the prompts, and every process gets the whole rollout, laid
            out exactly as one process would lay it out.
        score_policy: False skips the policy's scoring forward of a critic-free policy:
            ``logprobs`` are then the sampler's own, in its precision (``sampler_logprobs``
            None). For an update whose old log-probs are its own forward's, detached
            (:func:`alignkit.recipes.rl.single_step`), which measures the sampler's gap.
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

    # 1. sample this process's share: left padding + KV cache, in prompt order. The sampler
    # records each token's log-prob: in the policy's precision the scoring forward's to ~1e-6
    # (cached, left-padded), from a half-precision sampler further (measured: sampler_mismatch).
    responses: list[list[int]] = []
    sampled: list[list[float]] = []
    sampled_values: list[list[float] | None] = []
    gen = dataclasses.replace(gen, do_sample=True, top_k=0, top_p=1.0)
    # in the precision the policy trains in (mixed precision autocasts the forwards), or gen.dtype's
    # together: a non-finite distribution in one process's share stops every process (see generate)
    with engine.together(), engine.for_generation(actor_critic) as inner, engine.autocast():
        sampler = sampler_model(inner.policy, gen, engine)
        if not score_policy and inner.has_critic:
            raise ValueError("score_policy=False needs a critic-free policy")
        from_sampler = score_policy and gen.cache != "static" and scores_while_sampling(inner, sampler, engine)
        head = inner.value_head if from_sampler and inner.value_model is None else None
        for start in range(0, len(mine), gen.batch_size):
            chunk = [jobs[j] for j in mine[start:start + gen.batch_size]]
            out, lps, vals = _sample(sampler, tokenizer, [prompt_ids[p] for p, _ in chunk], chunk, gen, seed,
                                     engine.synced_generation, value_head=head)
            responses += out
            sampled += [lp[:len(r)] for r, lp in zip(out, lps)]
            sampled_values += [v[:len(r)] for r, v in zip(out, vals)] if vals is not None else [None] * len(out)
    triples = engine.gather(list(zip(responses, sampled, sampled_values)))
    responses, sampled, sampled_values = ([t[k] for t in triples] for k in range(3))
    # 2. one layout for everything that follows (rollout scoring and update), the same on every process
    ids, attn, pos, resp, mask, P = layout([prompt_ids[p] for p, _ in jobs], responses, pad_id)

    # 3. score this process's rows: policy log-probs and values in one forward (or, see
    #    scores_while_sampling, the sampler's), reference log-probs on the same rows with the same shapes
    sampler_logprobs, sampler_values = torch.zeros(resp.shape), torch.zeros(resp.shape)
    for i, (lp, v) in enumerate(zip(sampled, sampled_values)):
        sampler_logprobs[i, :len(lp)] = torch.tensor(lp)
        if v is not None:
            sampler_values[i, :len(v)] = torch.tensor(v)
    scorer = engine.unwrap(actor_critic)
    device = next(scorer.parameters()).device
    value_model = getattr(scorer, "value_model", None)
    values_alone = _value_model_alone(value_model) if value_model is not None else None
    scored: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    lengths = attn.sum(-1).tolist()
    # rows of like length together: little padding; with n answers per prompt, a prompt's answers
    # together, each chunk running its prompts once
    share = shares_prompts(scorer.policy, n)
    ref_forward = forward_shared_prompts if share else forward_responses
    policy_forward = forward_shared_prompts if share and not scorer.has_critic else forward_responses
    by_length = sorted(mine, key=lambda j: (jobs[j][0] if share else 0, lengths[j], j))
    for start in range(0, len(by_length), forward_batch_size):
        chunk = by_length[start:start + forward_batch_size]
        sel = torch.tensor(chunk)
        batch = (ids[sel].to(device), attn[sel].to(device), pos[sel].to(device), resp[sel].to(device))
        ref_lp, _, _ = ref_forward(reference, *batch, gen.temperature)
        if from_sampler and head is not None:
            lp, v = sampler_logprobs[sel], sampler_values[sel]
        elif from_sampler:  # a separate value model: its forward alone
            lp, v = sampler_logprobs[sel], forward_responses(values_alone, *batch, gen.temperature)[1]
        elif score_policy:
            lp, v, _ = policy_forward(scorer, *batch, gen.temperature)
        else:
            lp, v = sampler_logprobs[sel], None
        v = torch.zeros_like(lp) if v is None else v  # a critic-free policy: values are 0
        scored.update(zip(chunk, zip(lp.float().cpu(), ref_lp.float().cpu(), v.float().cpu())))
    rows = engine.gather([scored[j] for j in mine])
    logprobs, ref_logprobs, values = (torch.stack([r[k] for r in rows]) if rows else torch.zeros(resp.shape)
                                      for k in range(3))
    zero = torch.zeros(())
    logprobs, ref_logprobs, values = (torch.where(mask, x, zero) for x in (logprobs, ref_logprobs, values))

    finished = torch.tensor([bool(r) and r[-1] == eos for r in responses])
    texts = tuple(tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses)
    actor_critic.train(was_training)
    return Rollout(ids, attn, pos, P, resp, mask, logprobs, ref_logprobs, values, finished,
                   torch.tensor([p for p, _ in jobs], dtype=torch.long), texts, gen.temperature,
                   sampler_logprobs if score_policy else None)
