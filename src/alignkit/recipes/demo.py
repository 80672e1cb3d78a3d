"""The built-in demo: load the built-in model and answer one chat prompt.

    alignkit demo
"""

from __future__ import annotations

from alignkit.recipes.chat import chat

DEMO_PROMPT = "In two sentences, what is reinforcement learning from human feedback?"


def cli(argv: list[str], stage: str = "demo") -> int:
    return chat(["--greedy", "--max-new-tokens", "96", *argv, DEMO_PROMPT])
