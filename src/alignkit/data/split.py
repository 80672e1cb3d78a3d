"""Held-out splits shared by the training recipes."""

from __future__ import annotations

import random

from alignkit.errors import AlignkitError


def split_off(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded random ``fraction`` held out, at least one item each."""
    if fraction <= 0:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(items) * fraction)), len(items) - 1)
    if n_eval < 1:
        raise AlignkitError(f"data.eval_fraction={fraction}: {len(items)} item(s) are too few to hold any out")
    held = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
