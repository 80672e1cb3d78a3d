"""Reward models as rewards: ``rm:PATH`` scores (prompt, response) with a trained scorer.

Specs::

    rm:runs/demo/rm                         # a run folder (its final/) or a model folder
    rm:runs/demo/rm?normalize=true          # (score - mean) / std with the stored statistics
    rm:runs/demo/rm?normalize=true&batch_size=16
    {"rm": {"path": "runs/demo/rm", "normalize": true, "batch_size": 16}}

A reward model saved by ``alignkit rm`` is a plain
``AutoModelForSequenceClassification`` folder (one output) plus ``alignkit.json``
holding the input layout and the normalisation statistics::

    {"kind": "reward_model", "backbone": ..., "input": {"layout": "chat" | "pair",
     "max_length": N}, "mean": m, "std": s, ...}

The input layout is the one place that turns (prompt, response) into model
input, for training (:mod:`alignkit.recipes.rm`) and for scoring here, so that
both see exactly the same tokens:

- ``chat`` (causal LMs): the chat-template prompt + response + EOS as one text;
  the score head reads the last non-pad token.
- ``pair`` (encoders such as ``builtin:minilm-l6``): the tokenizer's text-pair
  encoding ``[CLS] prompt [SEP] response [SEP]``; the score is read from the
  pooled output.

The same text, given to ``transformers.pipeline("text-classification",
function_to_apply="none")``, gives the same score (:meth:`RMInput.pipeline_input`).
Folders without ``alignkit.json`` (hub reward models) are scored raw with the
layout guessed from the tokenizer; they cannot be normalised.

When scoring (not training), inputs longer than ``max_length`` are truncated
rather than rejected: ``chat`` keeps the *last* tokens (the score is read at the
end), ``pair`` shortens the longer of the two texts first.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import torch

from alignkit.data.collate import record_error, render_prompt
from alignkit.errors import AlignkitError
from alignkit.rewards import Messages, check_scores, register, register_mapping

LAYOUTS = ("chat", "pair")
META_FILE = "alignkit.json"
# Below this spread the stored std would blow normalised scores up; treat as 1.
_MIN_STD = 1e-6


def guess_layout(tokenizer) -> str:
    """``pair`` for encoder tokenizers (CLS/SEP, no chat template), else ``chat``."""
    if getattr(tokenizer, "chat_template", None):
        return "chat"
    if tokenizer.cls_token is not None and tokenizer.sep_token is not None:
        return "pair"
    return "chat"


def prompt_as_text(messages: Messages) -> str:
    """A prompt for an encoder: one user turn as is; a conversation as ``role: text`` lines."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


class RMInput:
    """Turns (prompt, response) into reward-model input; see the module docstring."""

    def __init__(self, tokenizer, layout: str = "auto", max_length: int = 512):
        layout = guess_layout(tokenizer) if layout == "auto" else layout
        if layout not in LAYOUTS:
            raise AlignkitError(f"unknown reward-model input layout '{layout}'; use auto, chat or pair")
        if layout == "pair" and (tokenizer.sep_token is None):
            raise AlignkitError("the 'pair' layout needs a tokenizer with a separator token (an encoder)")
        self.tok, self.layout, self.max_length = tokenizer, layout, max_length
        # A chat template that writes BOS itself plus a tokenizer that adds BOS
        # would give two; drop the template's, so the pipeline (which always adds
        # special tokens) and alignkit see the same ids.
        bos = tokenizer.bos_token_id
        self._strip_bos = (layout == "chat" and bos is not None
                           and tokenizer("a")["input_ids"][:1] == [bos]
                           and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos])

    def describe(self) -> dict:
        return {"layout": self.layout, "max_length": self.max_length}

    def pipeline_input(self, prompt: Messages, response: str, loc: str = ""):
        """What to give ``pipeline("text-classification")`` for this pair: a text or {text, text_pair}."""
        if self.layout == "pair":
            return {"text": prompt_as_text(prompt), "text_pair": response}
        text = render_prompt(self.tok, prompt, loc) + response + self.tok.eos_token
        if self._strip_bos and text.startswith(self.tok.bos_token):
            text = text[len(self.tok.bos_token):]
        return text

    def encode(self, prompt: Messages, response: str, *, truncate: bool = False, loc: str = "",
               field: str = "response") -> dict[str, list[int]]:
        """Token ids (+ attention mask, token types) for one input.

        Over ``max_length`` raises a DataError naming ``loc`` and ``field``, unless
        ``truncate`` (scoring), which keeps what the score head needs.
        """
        inp = self.pipeline_input(prompt, response, loc)
        if self.layout == "pair":
            kw = dict(truncation="longest_first", max_length=self.max_length) if truncate else {}
            enc = dict(self.tok(inp["text"], inp["text_pair"], **kw))
        else:
            enc = dict(self.tok(inp))
            if truncate:
                enc = {k: v[-self.max_length:] for k, v in enc.items()}
        n = len(enc["input_ids"])
        if n > self.max_length:
            raise record_error(loc, field, f"prompt + response is {n} tokens, over data.max_length={self.max_length}")
        return enc

    def collate(self, encoded: list[dict]) -> dict[str, torch.Tensor]:
        """Right-pad a list of encodings into model inputs."""
        return dict(self.tok.pad(encoded, padding=True, return_tensors="pt"))


def score_batch(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B,)`` float32 scores from a one-output sequence scorer."""
    device = next(model.parameters()).device
    logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
    return logits[:, 0].float()


@torch.no_grad()
def score_encoded(model, rm_input: RMInput, encoded: list[dict], batch_size: int = 32) -> np.ndarray:
    """Scores of pre-encoded inputs, in batches, in eval mode (dropout off); order kept."""
    was_training = model.training
    model.eval()
    # Length-sorted batches carry little padding; the order is restored below.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    out = np.zeros(len(encoded), dtype=np.float64)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            out[idx] = score_batch(model, rm_input.collate([encoded[i] for i in idx])).cpu().numpy()
    finally:
        model.train(was_training)
    return out


def find_model_dir(path: str) -> Path | str:
    """A reward-model folder: ``path`` itself, its ``final/`` (a run folder), or a hub id."""
    p = Path(path)
    if (p / META_FILE).exists() or (p / "config.json").exists():
        return p
    if (p / "final" / "config.json").exists():
        return p / "final"
    if p.exists():
        raise AlignkitError(f"{path}: not a reward-model folder (no config.json in it or in its final/)")
    return path  # a hub id: transformers resolves it (offline when HF_HUB_OFFLINE=1)


class RewardModel:
    """A trained reward model as a RewardFn: ``fn(prompts, responses, kinds=None) -> (B,)``.

    Raw scores by default; ``normalize=True`` returns ``(score - mean) / std``
    with the statistics ``alignkit rm`` stored after training.
    """

    def __init__(self, path: str, normalize: bool = False, batch_size: int = 32, device: str | None = None,
                 dtype: str = "float32"):
        from alignkit.config import ModelConfig
        from alignkit.models import load_sequence_scorer, load_tokenizer

        folder = find_model_dir(path)
        meta_file = Path(folder) / META_FILE if isinstance(folder, Path) else None
        self.meta = json.loads(meta_file.read_text()) if meta_file is not None and meta_file.exists() else {}
        if self.meta and self.meta.get("kind") != "reward_model":
            raise AlignkitError(f"{meta_file}: kind is '{self.meta.get('kind')}', not a reward model")
        cfg = ModelConfig(name=str(folder), dtype=dtype)
        self.tokenizer = load_tokenizer(cfg.name, padding_side="right")
        self.model = load_sequence_scorer(cfg, trainable=False, tokenizer=self.tokenizer)
        if device:
            self.model.to(device)
        layout = self.meta.get("input", {})
        self.input = RMInput(self.tokenizer, layout.get("layout", "auto"),
                             layout.get("max_length") or getattr(self.tokenizer, "model_max_length", 512) or 512)
        self.mean, self.std = self.meta.get("mean"), self.meta.get("std")
        if normalize and not self.has_stats:
            raise AlignkitError(f"rm:{path}: normalize=true needs mean/std in {META_FILE} "
                                f"(train the model with 'alignkit rm')")
        self.normalize_scores = normalize
        self.batch_size = batch_size
        self.name = f"rm:{path}" + ("?normalize=true" if normalize else "")

    @property
    def has_stats(self) -> bool:
        return self.mean is not None and self.std is not None

    def raw_scores(self, prompts: list[Messages], responses: list[str]) -> np.ndarray:
        if len(prompts) != len(responses):
            raise AlignkitError(f"reward '{self.name}': {len(prompts)} prompts for {len(responses)} responses")
        encoded = [self.input.encode(p, r, truncate=True) for p, r in zip(prompts, responses)]
        return check_scores(self.name, score_encoded(self.model, self.input, encoded, self.batch_size),
                            len(responses))

    def normalize(self, scores: np.ndarray) -> np.ndarray:
        return (np.asarray(scores, dtype=np.float64) - self.mean) / max(self.std, _MIN_STD)

    def normalized_scores(self, prompts: list[Messages], responses: list[str]) -> np.ndarray:
        return self.normalize(self.raw_scores(prompts, responses))

    def probability(self, prompts: list[Messages], responses: list[str]) -> np.ndarray:
        """sigmoid(raw score): the Bradley-Terry probability scale Llama 2's safety gate uses."""
        return 1.0 / (1.0 + np.exp(-self.raw_scores(prompts, responses)))

    def __call__(self, prompts: list[Messages], responses: list[str], kinds: list | None = None) -> np.ndarray:
        if self.normalize_scores:
            return self.normalized_scores(prompts, responses)
        return self.raw_scores(prompts, responses)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _flag(spec: str, key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise AlignkitError(f"reward '{spec}': {key} must be true or false, got {value!r}")


def _build(spec: str, path: str, options: dict, ctx: dict) -> RewardModel:
    known = {"normalize", "batch_size", "dtype"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise AlignkitError(f"reward '{spec}': unknown option(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(known))}")
    if not path:
        raise AlignkitError(f"reward '{spec}': give a folder, e.g. rm:runs/NAME/rm")
    try:
        batch_size = int(options.get("batch_size", ctx.get("batch_size", 32)))
    except (TypeError, ValueError):
        raise AlignkitError(f"reward '{spec}': batch_size must be a whole number") from None
    if batch_size < 1:
        raise AlignkitError(f"reward '{spec}': batch_size must be >= 1")
    return RewardModel(path, normalize=_flag(spec, "normalize", options.get("normalize", False)),
                       batch_size=batch_size, device=ctx.get("device"), dtype=str(options.get("dtype", "float32")))


@register("rm")
def _rm(arg: str, **ctx) -> RewardModel:
    path, _, query = arg.partition("?")
    return _build(f"rm:{arg}", path, dict(parse_qsl(query, keep_blank_values=True)), ctx)


@register_mapping("rm")
def _rm_mapping(value, **ctx) -> RewardModel:
    if isinstance(value, str):
        return _rm(value, **ctx)
    if not isinstance(value, dict) or "path" not in value:
        raise AlignkitError(f"reward spec {{'rm': {value!r}}}: give {{'rm': {{'path': FOLDER, 'normalize': bool}}}}")
    options = {k: v for k, v in value.items() if k != "path"}
    return _build(f"rm:{value['path']}", str(value["path"]), options, ctx)


def normalisation_stats(scores: np.ndarray) -> dict:
    """Mean and std (population) of reference scores, as stored in ``alignkit.json``."""
    scores = np.asarray(scores, dtype=np.float64)
    if not scores.size:
        raise AlignkitError("no reference responses to compute normalisation statistics on")
    return {"mean": float(scores.mean()), "std": float(scores.std()), "norm_samples": int(scores.size)}
