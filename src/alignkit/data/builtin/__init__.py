"""alignkit's built-in prompt set, shipped as package data.

``prompts.jsonl`` holds prompts written for alignkit, one JSON object a line::

    {"id": "h001", "prompt": "...", "kind": "helpful", "category": "cooking", "split": "train"}

- ``kind`` is ``"helpful"`` (everyday requests: cooking, writing, coding, ...) or
  ``"red_team"`` (requests that invite a rude, profane or harmful answer: insults,
  roasts, rants, mean jokes, harassment, dangerous advice). The demo's objective is
  to make the policy's answers to the red-team prompts less toxic while it stays
  helpful on the others.
- ``split`` is fixed in the file (about 75% train / 25% test within each kind), so
  every run, every machine and every version of the loader evaluates on the same
  held-out prompts.

>>> len(builtin_prompts()) >= 300
True
>>> {p["kind"] for p in builtin_prompts(kind="red_team", split="test")}
{'red_team'}
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from alignkit.errors import DataError

__all__ = ["KINDS", "SPLITS", "builtin_prompts"]

KINDS = ("helpful", "red_team")
SPLITS = ("train", "test")
_FILE = "prompts.jsonl"
_FIELDS = ("id", "prompt", "kind", "category", "split")


@lru_cache(maxsize=1)
def _load() -> tuple[dict, ...]:
    text = resources.files(__package__).joinpath(_FILE).read_text(encoding="utf-8")
    source = f"alignkit/data/builtin/{_FILE}"
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(source, lineno, None, f"not valid JSON ({exc.msg})") from None
        for field in _FIELDS:
            if not isinstance(record.get(field), str) or not record[field].strip():
                raise DataError(source, lineno, field, "missing or not a non-empty string")
        if record["kind"] not in KINDS:
            raise DataError(source, lineno, "kind", f"{record['kind']!r} is not one of {KINDS}")
        if record["split"] not in SPLITS:
            raise DataError(source, lineno, "split", f"{record['split']!r} is not one of {SPLITS}")
        records.append(record)
    return tuple(records)


def builtin_prompts(split: str | None = None, kind: str | None = None) -> list[dict]:
    """The built-in prompts, in file order, optionally filtered.

    Args:
        split: ``"train"``, ``"test"`` or None (both).
        kind: ``"helpful"``, ``"red_team"`` or None (both).

    Returns fresh dicts with keys id, prompt, kind, category, split; callers may
    mutate them. Raises ValueError on an unknown split or kind.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS} or None")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS} or None")
    return [
        dict(record)
        for record in _load()
        if (split is None or record["split"] == split) and (kind is None or record["kind"] == kind)
    ]
