"""The policy and its critic, and the frozen reference, as the PPO rollout and update call them.

Both are called ``(input_ids, attention_mask, position_ids, logits_to_keep) ->
(logits, values)`` on the rollout's layout (:func:`alignkit.rollout.layout`), so
that the rollout and the update run exactly the same computation. Without a critic
they also take ``cache``, a transformers KV cache the forward reads and extends in
place: the answers to one prompt then run that prompt once
(:func:`alignkit.rollout.forward_shared_prompts`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from alignkit.models import adapter_disabled, frozen_copy, is_peft
from alignkit.rollout import cache_kwarg


class ActorCritic(nn.Module):
    """The policy LM and its critic, called as ``(ids, attention, positions, keep) -> (logits, values)``.

    Shared mode: a linear value head reads the policy's last hidden state, so one
    forward gives both; the value loss reaches the trunk only through vf_coef.
    Separate mode: a sequence scorer's backbone + its ``score`` head, read at every
    token (a reward model's head is a per-token value estimate's natural start).
    ``critic=False`` (the critic-free optimisers): the policy alone, values None.
    """

    def __init__(self, policy, value_model=None, critic: bool = True):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.has_critic = critic
        # FSDP wraps each decoder layer of the models inside (what transformers calls _no_split_modules).
        self._no_split_modules = sorted({name for m in (policy, value_model) if m is not None
                                         for module in m.modules()
                                         for name in (getattr(module, "_no_split_modules", None) or [])})
        if value_model is None and critic:
            self.value_head = nn.Linear(policy.config.hidden_size, 1)
            # Zero: values start at 0 and the first value-loss gradients leave the trunk alone.
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    @property
    def critic(self) -> nn.Module | None:
        if not self.has_critic:
            return None
        return self.value_model if self.value_model is not None else self.value_head

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int, cache=None):
        if not self.has_critic:
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              logits_to_keep=logits_to_keep, use_cache=cache is not None,
                              **({cache_kwarg(self.policy): cache} if cache is not None else {}))
            return out.logits, None
        if cache is not None:
            raise ValueError("a KV cache is for the critic-free policy only")
        shared = self.value_model is None
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          logits_to_keep=logits_to_keep, output_hidden_states=shared, use_cache=False)
        if shared:
            hidden = out.hidden_states[-1][:, -logits_to_keep:]
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        else:
            values = token_values(self.value_model, input_ids, attention_mask, position_ids, logits_to_keep)
        return out.logits, values


def token_values(scorer, input_ids, attention_mask, position_ids, keep: int) -> torch.Tensor:
    """A sequence scorer's head applied at every one of the last ``keep`` positions: ``(B, keep)``."""
    base = scorer.get_base_model() if is_peft(scorer) else scorer
    hidden = base.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state[:, -keep:]
    return base.score(hidden).squeeze(-1).float()


def reference_forward(policy, autocast=contextlib.nullcontext):
    """The frozen reference as ``(ids, attention, positions, keep) -> (logits, None)``.

    With LoRA, the policy itself with the adapter off: no second copy of the base
    weights, and the same module shapes as the policy's forward. ``autocast`` is
    the precision context of the policy's forwards (the engine's), so that under
    mixed precision policy and reference compute alike and the KL starts at 0.
    """
    ref_model = None if is_peft(policy) else frozen_copy(policy)

    def forward(input_ids, attention_mask, position_ids, logits_to_keep, cache=None):
        ctx = adapter_disabled(policy) if ref_model is None else contextlib.nullcontext()
        with ctx, autocast():
            out = (ref_model or policy)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                        logits_to_keep=logits_to_keep, use_cache=cache is not None,
                                        **({cache_kwarg(policy): cache} if cache is not None else {}))
        return out.logits, None

    forward.model = ref_model  # the frozen copy (None with LoRA): the engine places it
    return forward
