"""Sequences that start with the same tokens, run with that start once.

Preference data is two answers to one prompt: a causal model's states over the
prompt are the same in both sequences, so the prompt can run once and its keys and
values (the KV cache) serve both answers, which run after it at the positions that
go on from it. Gradients flow through the cache to the prompt's forward, so
training sees exactly what running each sequence whole would give, to float
rounding. With a chat template the prompt is often half of each sequence.

An encoder (bidirectional attention) cannot do this: its prompt states depend on
the answer. Nor can a model under gradient checkpointing in training, where
transformers turns its cache off.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from alignkit.data.collate import length_chunks, pad


def can_share_prefixes(model) -> bool:
    """Causal attention everywhere, and a KV cache available in training (no gradient checkpointing)."""
    from transformers import PreTrainedModel

    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    checkpointing = any(isinstance(m, PreTrainedModel) and m.is_gradient_checkpointing for m in model.modules())
    return bool(flags) and all(flags) and not checkpointing


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens ``a`` and ``b`` start with in common, leaving each at least one of its own."""
    n = 0
    for x, y in zip(a[:len(a) - 1], b[:len(b) - 1]):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Suffixes:
    """One chunk of suffixes run on their prefixes' cache: ``rows`` index the suffixes given, ``ids``
    and ``mask`` are them right-padded, ``owner`` their prefixes, ``out`` the model's output."""

    rows: list[int]
    ids: torch.Tensor
    mask: torch.Tensor
    owner: torch.Tensor
    out: object


def prefix_forward(model, prefixes: list[list[int]], suffixes: list[list[int]], owner: list[int], pad_id: int,
                   chunk: int, **prefix_kwargs) -> tuple[object, Iterator[Suffixes]] | None:
    """Run each prefix once, then every suffix after its prefix (``owner[i]`` is suffix i's).

    The prefixes run in one forward, left-padded, so that each ends at the last column
    (``prefix_kwargs`` go to that forward, e.g. ``logits_to_keep=1``). The suffixes then
    run shortest first in chunks of ``chunk``, each right-padded to its own longest, on a
    copy of their prefixes' rows of the cache. Returns ``(prefix output, chunks)``
    (a generator: each chunk's graph is built as it is taken), or None when the model
    returns no KV cache.
    """
    from alignkit.rollout import cache_kwarg

    device = next(model.parameters()).device
    p_ids = pad(prefixes, pad_id, side="left").to(device)
    p_attn = pad([[1] * len(p) for p in prefixes], 0, side="left").to(device)
    out = model(input_ids=p_ids, attention_mask=p_attn, position_ids=(p_attn.cumsum(-1) - 1).clamp(min=0),
                use_cache=True, **prefix_kwargs)
    cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "layers"):
        return None
    starts = torch.tensor([len(p) for p in prefixes], device=device)

    def chunks() -> Iterator[Suffixes]:
        for rows in length_chunks([len(s) for s in suffixes], chunk):
            mine = torch.tensor([owner[i] for i in rows], device=device)
            ids = pad([suffixes[i] for i in rows], pad_id).to(device)
            mask = pad([[1] * len(suffixes[i]) for i in rows], 0).bool().to(device)
            positions = starts[mine][:, None] + torch.arange(ids.shape[1], device=device)
            res = model(input_ids=ids, attention_mask=torch.cat([p_attn[mine], mask.long()], dim=1),
                        position_ids=positions, use_cache=True, **{cache_kwarg(model): cache_rows(cache, mine)})
            yield Suffixes(rows, ids, mask, mine, res)

    return out, chunks()


def cache_rows(cache, rows: torch.Tensor):
    """A copy of ``cache`` holding ``rows`` of its batch, in that order (a row may repeat), still in the
    autograd graph; ``cache`` itself is left as it is, for the next chunk."""
    twin = copy.copy(cache)
    twin.layers = [copy.copy(layer) for layer in cache.layers]
    twin.batch_select_indices(rows)
    return twin
