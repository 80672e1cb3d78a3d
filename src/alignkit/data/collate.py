"""Tokenisation, masks and padding shared by every recipe.

Prompt and response are tokenised separately and concatenated, so the boundary
is exact: the response mask is True on response tokens only (SFT loss, sequence
log-probabilities for DPO, the PPO action tokens). The response ends with EOS,
as generation does. Training batches are right-padded; generation batches are
left-padded (see :mod:`alignkit.rollout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.errors import AlignkitError, DataError

Messages = list[dict]


def render_prompt(tokenizer, messages: Messages, loc: str = "", field: str = "prompt") -> str:
    """The prompt text up to where the assistant's answer starts.

    Uses the tokenizer's chat template; a tokenizer without one (a base model)
    gets the Anthropic HH layout ``\\n\\nHuman: ...\\n\\nAssistant:``. A template that
    refuses the conversation (many raise on roles that do not alternate, or on a
    system message) is a DataError naming the record ``loc`` (``file:line``) and
    ``field``, or an AlignkitError where no record is known.
    """
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as e:
            roles = ", ".join(str(m.get("role")) for m in messages)
            problem = (f"the model's chat template refuses this conversation ({e}; roles: {roles})")
            raise record_error(loc, field, problem) if loc else AlignkitError(problem) from None
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages) + "\n\nAssistant:"


def record_error(loc: str, field: str | None, problem: str) -> DataError:
    """A DataError for the record at ``loc`` (``file:line N``, as :func:`~alignkit.data.formats.where` writes it)."""
    source, _, location = loc.rpartition(":") if loc else ("data", "", None)
    return DataError(source or loc, location or None, field, problem)


def encode_prompt(tokenizer, messages: Messages, loc: str = "", field: str = "prompt") -> list[int]:
    return tokenizer(render_prompt(tokenizer, messages, loc, field), add_special_tokens=False)["input_ids"]


def encode_prompts(tokenizer, prompts: list, max_prompt_length: int | None, on_error: str = "raise", *,
                   setting: str = "data.max_prompt_length", context: int | None = None,
                   max_new_tokens: int = 0) -> tuple[list, list[list[int]]]:
    """``(kept prompts, their token ids)``, checked before anything samples.

    ``prompts`` are :class:`~alignkit.data.formats.PromptExample` (``.prompt``, ``.loc``).
    A prompt over ``max_prompt_length`` tokens (the config key ``setting``), or one
    after which ``max_new_tokens`` would not fit the model's ``context``, is a
    DataError naming its file and line; with ``on_error=skip`` it is skipped and
    counted in one warning. Every stage that samples calls this first, so that a
    10 MB prompt fails in the time it takes to tokenise it, not after minutes of work.
    """
    from alignkit.data.io import ErrorPolicy

    policy = ErrorPolicy(on_error)
    kept, ids = [], []
    for ex in prompts:
        policy.total += 1
        try:
            p = encode_prompt(tokenizer, ex.prompt, ex.loc)
        except DataError as e:  # the chat template refuses it
            policy.handle(e)
            continue
        problem = None
        if max_prompt_length is not None and len(p) > max_prompt_length:
            problem = f"prompt is {len(p)} tokens, over {setting}={max_prompt_length}"
        elif context is not None and len(p) + max_new_tokens > context:
            problem = (f"prompt is {len(p)} tokens: with up to {max_new_tokens} new tokens it does not fit the "
                       f"model's context of {context} tokens")
        if problem:
            policy.handle(record_error(ex.loc or "prompts", "prompt", problem))
            continue
        kept.append(ex)
        ids.append(p)
    policy.report("prompts")
    return kept, ids


def encode_response(tokenizer, text: str, add_eos: bool = True) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if add_eos else ids


@dataclass(frozen=True)
class Encoded:
    """One prompt + response: ``input_ids`` and a response mask of the same length."""

    input_ids: list[int]
    prompt_len: int

    @property
    def response_mask(self) -> list[bool]:
        return [False] * self.prompt_len + [True] * (len(self.input_ids) - self.prompt_len)


def encode_example(tokenizer, prompt: Messages, response: str, max_length: int, loc: str = "",
                   field: str = "completion", prompt_ids: list[int] | None = None) -> Encoded:
    """Tokenise prompt + response; over ``max_length`` is a DataError naming the record."""
    p = prompt_ids if prompt_ids is not None else encode_prompt(tokenizer, prompt, loc)
    r = encode_response(tokenizer, response)
    if len(p) + len(r) > max_length:
        raise record_error(loc, field, f"prompt + response is {len(p) + len(r)} tokens, over "
                                       f"data.max_length={max_length}")
    return Encoded(p + r, len(p))


def pad(seqs: list[list[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    width = max(len(s) for s in seqs)
    rows = []
    for s in seqs:
        fill = [pad_value] * (width - len(s))
        rows.append(s + fill if side == "right" else fill + s)
    return torch.tensor(rows, dtype=torch.long)


@dataclass
class Batch:
    """A right-padded training batch. ``response_mask`` is True on response tokens."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T) bool
    response_mask: torch.Tensor  # (B, T) bool

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device))


def length_chunks(lengths: list[int], size: int) -> list[list[int]]:
    """Positions of ``lengths``, shortest first, in chunks of at most ``size``.

    Each chunk is padded to its own longest row only: on preference data a batch
    padded to its longest row is ~25-30% padding, which the forward and backward
    pay for in full.

    >>> length_chunks([5, 9, 2, 7], 2)
    [[2, 0], [3, 1]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[k:k + size] for k in range(0, len(order), size)]


def collate(encoded: list[Encoded], pad_id: int) -> Batch:
    ids = pad([e.input_ids for e in encoded], pad_id)
    attn = pad([[1] * len(e.input_ids) for e in encoded], 0).bool()
    resp = pad([[int(x) for x in e.response_mask] for e in encoded], 0).bool()
    return Batch(ids, attn, resp)


def shift_for_lm(input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and mask aligned with logits[:, :-1]: token t+1 is predicted at t."""
    return input_ids[:, 1:], mask[:, 1:]


def response_logits(model, inputs: dict, response_mask: torch.Tensor):
    """``(logits, labels, mask)``: the model's logits at the positions that predict response tokens, with
    the labels and response mask aligned to them (token t+1 is predicted at t).

    The LM head runs from the first position any row's response needs (``logits_to_keep``), not
    over the prompts: a 49,152-token vocabulary's head is a fifth of a small model's matmuls per
    position, and its log-softmax reads and writes every logit. ``inputs`` are the model's keyword
    arguments (``input_ids`` and a mask or positions), ``response_mask`` ``(B, T)``.
    """
    width = response_mask.shape[1]
    scored = response_mask[:, 1:].any(0)  # the label columns some row scores
    start = int(scored.float().argmax()) if bool(scored.any()) else 0  # position start predicts token start+1
    logits = model(**inputs, use_cache=False, logits_to_keep=width - start).logits[:, :-1]
    return logits, inputs["input_ids"][:, start + 1:], response_mask[:, start + 1:]
