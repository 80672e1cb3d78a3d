"""Chat with a model, or generate responses for a prompt file.

    alignkit chat "What is RLHF?"                       # the built-in model
    alignkit chat --model runs/demo/ppo/final           # interactive when no prompt is given
    alignkit generate --prompts builtin:prompts --split test --n 4 --out completions.jsonl
    alignkit generate --prompts p.jsonl --best-of 8 --reward profanity --out best.jsonl

``generate --n K`` writes ``{"prompt", "completions": [...]}`` lines, the input of
the labeling app and of ``label-ai``; ``--best-of N --reward SPEC`` keeps the
highest-scoring of N samples per prompt (best-of-N at inference time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.config import GenerationConfig, ModelConfig, build, opt
from alignkit.errors import ConfigError
from alignkit.data.formats import load_prompts
from alignkit.models import load_causal_lm, load_tokenizer
from alignkit.rollout import generate


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin:smollm2-135m-instruct", help="model name or folder")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))


@dataclass
class Flags:
    """The flags that are not generation settings, with their ranges (checked like a YAML config's keys)."""

    seed: int = opt(0, ge=0, le=2**32 - 1, help="numpy's seed range")
    n: int = opt(1, ge=1)
    best_of: int = opt(0, ge=0, help="0: off")
    limit: int | None = opt(None, ge=1)


def from_flags(cls: type, args: argparse.Namespace, names: list[str], **fixed: Any):
    """``cls`` built from the parsed flags ``names`` (plus ``fixed`` values) by :func:`alignkit.config.build`,

    so a flag gets the checks its YAML key gets (ranges, finite numbers); an error names the flag:
    ``command line: --temperature must be a finite number, got nan``.
    """
    raw = {name: getattr(args, name) for name in names if hasattr(args, name)}
    try:
        return build(cls, {**raw, **fixed}, "command line")
    except ConfigError as e:
        message = str(e)
        for name in raw:
            message = message.replace(f"'{name}'", "--" + name.replace("_", "-"))
        raise ConfigError(message) from None


def _settings(args: argparse.Namespace) -> tuple[GenerationConfig, Flags]:
    """The generation settings and the other flags, checked before anything loads."""
    gen = from_flags(GenerationConfig, args, ["max_new_tokens", "temperature", "batch_size"],
                     do_sample=not args.greedy)
    return gen, from_flags(Flags, args, ["seed", "n", "best_of", "limit"])


def writable_file(path: str, flag: str) -> Path:
    """``path`` as a file that can be written, its folder made: checked before any work, so that a
    path that is a folder, or lies under a file, is a one-line error rather than a traceback after
    minutes of sampling."""
    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; give a file name (e.g. {out / 'completions.jsonl'})")
    blocked = next((q for q in out.parents if q.exists() and not q.is_dir()), None)
    if blocked is not None:
        raise ConfigError(f"{flag} {path}: {blocked} is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot make its folder ({e.strerror or e})") from None
    if not os.access(out if out.exists() else out.parent, os.W_OK):
        raise ConfigError(f"{flag} {path}: not writable")
    return out


def _load(args, gen: GenerationConfig):
    from alignkit.training import Engine

    engine = Engine(seed=args.seed)
    cfg = ModelConfig(name=args.model, dtype=args.dtype)
    tok = load_tokenizer(cfg.name, cfg.cache_dir)
    model = engine.place(load_causal_lm(cfg, trainable=False, tokenizer=tok))
    return model, tok, gen, engine


def chat(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alignkit chat", description="chat with a model")
    _common(p)
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("prompt", nargs="*", help="the message; without one, read messages from stdin")
    args = p.parse_args(argv)
    gen, _ = _settings(args)
    if args.prompt and not " ".join(args.prompt).strip():
        raise ConfigError("chat: the message is empty; give some text, or none to chat interactively")
    model, tok, gen, _ = _load(args, gen)
    history = [{"role": "system", "content": args.system}] if args.system else []

    def reply(text: str) -> str:
        history.append({"role": "user", "content": text})
        out = generate(model, tok, [list(history)], gen, seed=args.seed)[0]
        history.append({"role": "assistant", "content": out.text})
        return out.text

    if args.prompt:
        text = " ".join(args.prompt)
        print(f"user: {text}")
        print(f"assistant: {reply(text)}")
        return 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if line.strip():
            print(f"assistant: {reply(line.strip())}", flush=True)


def generate_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alignkit generate", description="generate responses for a prompt file")
    _common(p)
    p.add_argument("--prompts", required=True, help="prompt file, hub dataset or builtin:prompts")
    p.add_argument("--split", default="test")
    p.add_argument("--kind", default=None, help="builtin:prompts only: helpful or red_team")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--best-of", type=int, default=0, help="sample N and keep the best under --reward")
    p.add_argument("--reward", default=None, help="reward spec for --best-of (e.g. profanity)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True, help="output JSONL")
    args = p.parse_args(argv)
    from alignkit.errors import AlignkitError

    gen, _ = _settings(args)
    if args.best_of and not args.reward:
        raise AlignkitError("--best-of needs --reward SPEC")
    out = writable_file(args.out, "--out")  # before the sampling: a bad path fails in a second
    prompts = load_prompts(args.prompts, split=args.split, kind=args.kind, limit=args.limit, setting="--format")
    model, tok, gen, engine = _load(args, gen)
    from alignkit.data.collate import encode_prompts
    from alignkit.models import model_context

    prompts, _ = encode_prompts(tok, prompts, None, context=model_context(model), max_new_tokens=gen.max_new_tokens)
    n = args.best_of or args.n
    reward = None
    if args.best_of:  # before sampling: a bad spec fails in a second, not after minutes
        from alignkit.rewards import build_reward

        with engine.together():
            if engine.is_main:
                reward = build_reward(args.reward, device=engine.device)
    # under accelerate launch / torchrun each process samples its share; the main one writes
    gens = generate(model, tok, [q.prompt for q in prompts], gen, n=n, seed=args.seed, engine=engine)
    if not engine.is_main:
        return 0
    with out.open("w") as f:
        for i, q in enumerate(prompts):
            texts = [g.text for g in gens[i * n:(i + 1) * n]]
            row = {"id": q.id, "prompt": q.prompt, "model": args.model}
            if reward is not None:
                scores = reward([q.prompt] * n, texts).tolist()
                best = max(range(n), key=scores.__getitem__)
                row.update(response=texts[best], score=scores[best], scores=scores, completions=texts)
            elif n == 1:
                row["response"] = texts[0]
            else:
                row["completions"] = texts
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(prompts)} prompts x {n} samples to {out}")
    return 0


def cli(argv: list[str], stage: str = "chat") -> int:
    return generate_cli(argv) if stage == "generate" else chat(argv)
