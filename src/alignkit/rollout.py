"""The one place that samples from a model.

:func:`generate` batches prompts with left padding and a KV cache (transformers'
``generate``) and returns, for each prompt and each of its ``n`` samples, the
response text, its token ids and whether it ended with EOS. Update code never
samples; recipes call this (PPO adds log-probabilities on top, see ppo).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
        if gen.do_sample:
            kwargs.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k or None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        seq = model.generate(input_ids=ids, attention_mask=attn, **kwargs)
        new = seq[:, ids.shape[1]:].tolist()
        for j, row in zip(chunk, new):
            p, s = jobs[j]
            resp = trim_response(row, eos, pad_id)
            finished = bool(resp) and resp[-1] == eos
            text = tokenizer.decode(resp, skip_special_tokens=True).strip()
            results[j] = Generation(p, s, tuple(encoded[p]), tuple(resp), text, finished)
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
