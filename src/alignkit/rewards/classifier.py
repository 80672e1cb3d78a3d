"""``classifier:MODEL[:LABEL[:logit|prob]]``: a text classifier's score for one label, as a reward.

MODEL is a hub id or a local folder holding a transformers sequence-classification
model; LABEL a label name from its config (``id2label``) or an index; the score is
that label's raw logit (the default, as in the detoxification recipes that reward
``nothate``) or its probability (softmax over the labels; sigmoid for a
one-output or multi-label model). The classifier reads the response only.

    classifier:facebook/roberta-hate-speech-dynabench-r4-target:nothate
    classifier:./my-toxicity-model:toxic:prob     # then combine with a negative weight
    classifier:./sentiment:1:prob

With a single-output model LABEL may be left out (``classifier:MODEL:prob``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from alignkit.errors import AlignkitError
from alignkit.rewards import Messages, check_scores, register

OUTPUTS = ("logit", "prob")
# Longest input the classifier reads, in tokens, when its tokenizer declares no limit.
DEFAULT_MAX_LENGTH = 512


def parse_spec(arg: str) -> tuple[str, str | None, str]:
    """``MODEL[:LABEL[:logit|prob]]`` -> (model, label, output).

    A local folder whose own name holds a colon is taken whole.

    >>> parse_spec("org/model:nothate")
    ('org/model', 'nothate', 'logit')
    >>> parse_spec("org/model:1:prob")
    ('org/model', '1', 'prob')
    >>> parse_spec("org/model")
    ('org/model', None, 'logit')
    """
    if not arg:
        raise AlignkitError("classifier reward needs a model: classifier:MODEL[:LABEL[:logit|prob]]")
    if Path(arg).is_dir():
        return arg, None, "logit"
    parts = arg.split(":")
    output = "logit"
    if len(parts) >= 3 and parts[-1] in OUTPUTS:
        output = parts.pop()
    if len(parts) >= 2 and not Path(":".join(parts)).is_dir():
        label = parts.pop()
        return ":".join(parts), label or None, output
    return ":".join(parts), None, output


class ClassifierReward:
    """One label's logit or probability under a transformers text classifier."""

    def __init__(self, model: str, label: str | None = None, output: str = "logit", batch_size: int = 32,
                 device: str | None = None):
        if output not in OUTPUTS:
            raise AlignkitError(f"classifier reward: output must be logit or prob, got {output!r}")
        from alignkit.models import quiet_transformers

        quiet_transformers()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        local = Path(model).is_dir()
        offline = local or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=offline)
            self.model = AutoModelForSequenceClassification.from_pretrained(model, local_files_only=offline)
        except (OSError, ValueError) as e:
            raise AlignkitError(f"classifier reward: cannot load '{model}': {str(e).splitlines()[0]}") from None
        self.model.requires_grad_(False)
        self.model.eval()
        # The stage's engine device when a recipe builds it; where it loaded (the CPU) otherwise.
        self.device = torch.device(device or "cpu")
        self.model.to(self.device)
        if self.tokenizer.pad_token is None:
            # Decoder classifiers often ship without one; EOS is never read as content here.
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        names = {str(v).lower() for v in self.model.config.id2label.values()}
        if label is not None and label.lower() in OUTPUTS and label.lower() not in names:
            label, output = None, label.lower()  # classifier:MODEL:prob on a one-output model
        self.index = self._label_index(model, label)
        self.output = output
        self.batch_size = batch_size
        self.multi_label = self.model.config.problem_type == "multi_label_classification"
        limit = getattr(self.tokenizer, "model_max_length", None) or DEFAULT_MAX_LENGTH
        self.max_length = int(min(limit, DEFAULT_MAX_LENGTH))
        label_name = self.model.config.id2label.get(self.index, str(self.index))
        self.name = f"classifier:{model}:{label_name}:{output}"

    def _label_index(self, model: str, label: str | None) -> int:
        config = self.model.config
        n = config.num_labels
        names = {str(v): int(k) for k, v in config.id2label.items()}
        if label is None:
            if n == 1:
                return 0
            raise AlignkitError(f"classifier '{model}' has {n} labels ({', '.join(names)}); "
                                f"name one: classifier:{model}:LABEL")
        if label in names:
            return names[label]
        lowered = {k.lower(): v for k, v in names.items()}
        if label.lower() in lowered:
            return lowered[label.lower()]
        if label.isdigit() and int(label) < n:
            return int(label)
        raise AlignkitError(f"classifier '{model}' has no label '{label}'; its labels: {', '.join(names)}")

    @torch.no_grad()
    def logits(self, texts: list[str]) -> torch.Tensor:
        """``(B, num_labels)`` raw logits, in batches."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start:start + self.batch_size])
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            out.append(self.model(**enc).logits.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.num_labels)

    def __call__(self, prompts: list[Messages], responses: list[str]) -> np.ndarray:
        logits = self.logits(responses)
        if self.output == "logit":
            scores = logits[:, self.index]
        elif self.multi_label or logits.shape[1] == 1:
            scores = torch.sigmoid(logits[:, self.index])
        else:
            scores = torch.softmax(logits, dim=-1)[:, self.index]
        return check_scores(self.name, scores.numpy(), len(responses))


@register("classifier")
def _classifier(arg: str, **ctx):
    model, label, output = parse_spec(arg)
    return ClassifierReward(model, label, output, batch_size=int(ctx.get("batch_size", 32)), device=ctx.get("device"))
