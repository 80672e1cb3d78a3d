"""AI feedback (RLAIF): sample K responses per prompt and rank them with a reward.

    alignkit label-ai --config configs/label-ai-tiny.yaml                  # seconds, a tiny model
    alignkit label-ai --config configs/label-ai.yaml                       # built-in model, profanity
    alignkit label-ai --config configs/label-ai.yaml reward=judge:toxicity # an LLM judge ranks instead
    alignkit label-ai --config configs/label-ai.yaml data.path=completions.jsonl   # rank given completions

Any reward spec ranks (see :mod:`alignkit.rewards`): a classifier (``profanity``,
``classifier:...``), an LLM judge (``judge:quality``, ``judge:toxicity``), a rule,
a trained reward model (``rm:runs/x/rm/final``) or a combination. With
``data.path`` pointing at a file of ``{"prompt", "completions": [...]}`` records
(``alignkit generate --n K`` writes them) nothing is generated: the given
completions are ranked.

Output ``runs/NAME/label-ai/final/``:

- ``rankings.jsonl``: ``{"prompt", "completions": [K], "rankings": [{"labeler":
  REWARD, "ranks"}], "scores", "provenance"}``; ``ranks[i]`` is the dense 1-based
  rank of ``completions[i]`` (1 = highest score; scores within ``tie_tolerance``
  of a group's best share its rank);
- ``pairs.jsonl``: ``{"prompt", "chosen", "rejected", "margin", "provenance"}``,
  every pair of different ranks whose scores differ by at least ``min_gap``;
- ``summary.json``: counts (prompts, pairs, dropped completions, judge parse failures).

Both data files load with :func:`alignkit.data.formats.load_rankings` /
``load_preferences`` (so ``alignkit rm`` and ``alignkit dpo`` read them), and each
record says where it came from: model, reward, scores, seed.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.config import DataConfig, GenerationConfig, ModelConfig, RunConfig, opt, to_dict
from alignkit.data.formats import PromptExample, load_prompts, parse_prompt
from alignkit.data.io import ErrorPolicy, first_parsed, read_records
from alignkit.errors import AlignkitError, ConfigError, DataError
from alignkit.judges import JudgeStats
from alignkit.runs import RunDir
from alignkit.training import Engine

STAGE = "label-ai"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(path="builtin:prompts", format="prompts",
                                                                kind="red_team", limit=32))
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=64,
                                                                                  temperature=1.0))
    k: int = opt(4, ge=2, help="responses sampled per prompt")
    reward: Any = opt("profanity", help="the reward spec that ranks: profanity, judge:toxicity, rm:DIR, ...")
    tie_tolerance: float = opt(0.0, ge=0, help="scores this close to a rank's best share that rank")
    min_gap: float = opt(0.0, ge=0, help="keep a pair only when its scores differ by at least this")
    margin: str = opt("score_gap", choices=("score_gap", "rank_gap", "none"),
                      help="what pairs.jsonl writes as each pair's margin")
    run: RunConfig = field(default_factory=RunConfig)


@dataclass
class Item:
    prompt: list[dict]
    completions: list[str]
    id: str | None
    model: str  # who wrote the completions
    loc: str
    kind: str | None = None  # the prompt's tag (red_team, helpful): gated rewards route on it


# --------------------------------------------------------------------------- ranking


def dense_ranks(scores: list[float], tie_tolerance: float = 0.0) -> list[int]:
    """1 = best; scores within ``tie_tolerance`` of their group's best tie; no gaps.

    >>> dense_ranks([0.2, 0.9, 0.5, 0.9])
    [3, 1, 2, 1]
    >>> dense_ranks([1.0, 0.97, 0.9], tie_tolerance=0.05)
    [1, 1, 2]
    """
    ranks = [0] * len(scores)
    rank, top = 0, None
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        if top is None or top - scores[i] > tie_tolerance:
            rank, top = rank + 1, scores[i]
        ranks[i] = rank
    return ranks


def clean_completions(texts: list[str]) -> tuple[list[str], int, int]:
    """Completions without empty texts and exact repeats: (kept, n_empty, n_duplicate).

    A ranking needs distinct, non-empty completions (the ranking format rejects
    others), and a pair of two identical texts teaches nothing.
    """
    kept, seen, empty, dup = [], set(), 0, 0
    for t in texts:
        t = t.strip()
        if not t:
            empty += 1
        elif t in seen:
            dup += 1
        else:
            seen.add(t)
            kept.append(t)
    return kept, empty, dup


def ranking_pairs(scores: list[float], ranks: list[int], min_gap: float) -> tuple[list[tuple[int, int]], int]:
    """(better, worse) index pairs of different rank with a score gap >= min_gap; and how many fell short."""
    pairs, short = [], 0
    for i, j in itertools.combinations(range(len(scores)), 2):
        if ranks[i] == ranks[j]:
            continue
        best, worst = (i, j) if ranks[i] < ranks[j] else (j, i)
        if scores[best] - scores[worst] < min_gap:
            short += 1
            continue
        pairs.append((best, worst))
    return pairs, short


def _check_some_pairs(items: list[Item], flat_scores: list[float], cfg: Config, judge_stats=None) -> None:
    """No pair at all (every group's completions scored alike, or every gap under ``min_gap``) is an
    error, not a finished run with an empty ``pairs.jsonl`` that ``rm`` or ``dpo`` would stop on later.
    Where a judge could read none of its answers, that is named as the cause."""
    at = tied = short = 0
    for it in items:
        scores = flat_scores[at:at + len(it.completions)]
        at += len(it.completions)
        ranks = dense_ranks(scores, cfg.tie_tolerance)
        pairs, n_short = ranking_pairs(scores, ranks, cfg.min_gap)
        if pairs:
            return
        tied += len(set(ranks)) == 1
        short += n_short
    spec = cfg.reward if isinstance(cfg.reward, str) else json.dumps(cfg.reward, sort_keys=True)
    why = [f"the completions of {tied} of {len(items)} prompts all scored alike under {spec}"
           + (f" (within tie_tolerance={cfg.tie_tolerance:g})" if cfg.tie_tolerance else "")] if tied else []
    why += [f"{short} pairs differ by less than min_gap={cfg.min_gap:g}"] if short else []
    unread = judge_stats.warning("judgement", "got the fallback score", "no score tells the completions apart") \
        if judge_stats is not None else None
    cause = f" ({unread})" if unread else ""
    raise AlignkitError(f"label-ai: no pairs to write: {' and '.join(why)}{cause}; use a reward that tells the "
                        f"completions apart")


# --------------------------------------------------------------------------- inputs


def _given_completions(path: str, split: str, limit: int | None, on_error: str = "raise") -> list[Item] | None:
    """Records that already carry ``completions`` (None when the file holds plain prompts).

    A bad record is a located error, or with ``data.on_error=skip`` skipped and counted.
    """
    if path.startswith(("builtin:", "synthetic:")) or not Path(path).is_file():
        return None
    # the format is the first record that parses: an unreadable first line says nothing about it
    first, records = first_parsed(read_records(path, split))
    if first is None or "completions" not in first.data:
        return None
    policy = ErrorPolicy(on_error)
    items = []
    for rec in records:  # every record, those before the first that parses included
        if limit is not None and len(items) >= limit:
            break
        policy.total += 1
        try:
            if "__invalid__" in rec.data:
                raise rec.error(None, rec.data["__invalid__"])
            parsed = parse_prompt(rec)
            comps = rec.data.get("completions")
            if not isinstance(comps, list) or len(comps) < 2 or not all(isinstance(c, str) for c in comps):
                raise rec.error("completions", "must be a list of at least 2 texts")
        except DataError as e:
            policy.handle(e)
            continue
        items.append(Item(parsed.prompt, comps, parsed.id, str(rec.data.get("model") or "given"),
                          f"{rec.source}:{rec.location}", parsed.kind))
    policy.report("records with completions")
    if not items:
        raise AlignkitError(f"{path}: no usable records with completions")
    return items


def _sample(cfg: Config, prompts: list[PromptExample], engine: Engine) -> list[Item]:
    from alignkit.data.collate import encode_prompts
    from alignkit.models import load_causal_lm, load_tokenizer, model_context
    from alignkit.rollout import generate

    tok = load_tokenizer(cfg.model.name, cfg.model.cache_dir)
    model = engine.place(load_causal_lm(cfg.model, trainable=False, tokenizer=tok))
    prompts, prompt_ids = encode_prompts(tok, prompts, cfg.data.max_prompt_length, cfg.data.on_error,
                                         context=model_context(model), max_new_tokens=cfg.generation.max_new_tokens)
    if not prompts:
        raise AlignkitError(f"{cfg.data.path}: every prompt was skipped (see the warning above)")
    bar, task = engine.progress(len(prompts) * cfg.k, f"label-ai: sampling {cfg.k} per prompt")
    with bar:
        gens = generate(model, tok, [p.prompt for p in prompts], cfg.generation, n=cfg.k, seed=cfg.run.seed,
                        prompt_ids=prompt_ids, progress_cb=lambda n: bar.update(task, advance=n), engine=engine)
    return [Item(p.prompt, [g.text for g in gens[i * cfg.k:(i + 1) * cfg.k]], p.id, cfg.model.name, p.loc, p.kind)
            for i, p in enumerate(prompts)]


# --------------------------------------------------------------------------- the recipe


def main(cfg: Config, resume: bool = False) -> Path:
    from alignkit.rewards import build_reward
    from alignkit.rewards.combine import call_reward

    run = RunDir(cfg.run.output_dir, cfg.run.name, STAGE)
    if resume and run.is_done() and (run.final / "pairs.jsonl").exists():
        print(f"alignkit label-ai: {run.final} is already complete")
        return run.final
    if not cfg.data.path:
        raise ConfigError("data.path is empty: give prompts (a file, a hub dataset, builtin:prompts) "
                          "or a file of {prompt, completions} records")
    engine = Engine(seed=cfg.run.seed)
    if engine.is_main:
        run.write_config(cfg)
    started = time.time()
    # before sampling: a bad spec fails in a second, not after minutes
    reward = build_reward(cfg.reward, device=engine.device)

    # 1. responses: the given completions, or K samples per prompt from the model (each process its share)
    items = _given_completions(cfg.data.path, cfg.data.split, cfg.data.limit, cfg.data.on_error)
    if items is None:
        if not cfg.generation.do_sample:  # greedy decoding: k identical answers, nothing to rank
            raise ConfigError(f"label-ai samples k={cfg.k} answers per prompt to rank: generation.do_sample=false "
                              f"gives k identical answers; set generation.do_sample=true")
        prompts = load_prompts(cfg.data.path, cfg.data.split, cfg.data.on_error, cfg.data.kind, cfg.data.limit)
        items = _sample(cfg, prompts, engine)

    # 2. clean: a ranking needs at least two distinct non-empty completions
    counts = {"prompts": len(items), "dropped_empty": 0, "dropped_duplicate": 0, "prompts_skipped": 0}
    kept: list[Item] = []
    for it in items:
        texts, empty, dup = clean_completions(it.completions)
        counts["dropped_empty"] += empty
        counts["dropped_duplicate"] += dup
        if len(texts) < 2:
            counts["prompts_skipped"] += 1
            continue
        kept.append(Item(it.prompt, texts, it.id, it.model, it.loc, it.kind))
    if not kept:
        raise AlignkitError(f"label-ai: no prompt has two distinct non-empty completions "
                            f"({counts['dropped_empty']} empty, {counts['dropped_duplicate']} repeated)")

    # 3. score every completion with the reward (one call per process: judges and models batch it)
    flat_prompts = [it.prompt for it in kept for _ in it.completions]
    flat_texts = [t for it in kept for t in it.completions]
    flat_kinds = [it.kind for it in kept for _ in it.completions]
    with engine.together():
        mine = call_reward(reward, engine.shard(flat_prompts), engine.shard(flat_texts),
                           engine.shard(flat_kinds) if any(flat_kinds) else None).tolist()
    flat_scores = engine.gather(mine)
    stats = getattr(reward, "stats", None)
    judge_stats = stats.as_dict() if stats is not None and hasattr(stats, "as_dict") else None
    if judge_stats is not None and engine.num_processes > 1:  # every process's judgements
        judge_stats = engine.reduce_sum({k: v for k, v in judge_stats.items() if isinstance(v, (int, float))})
        judge_stats = {**{k: int(v) if float(v).is_integer() else v for k, v in judge_stats.items()},
                       "unparsable_examples": engine.gather(stats.examples)[:5]}  # a few, from any process
    # On every process (each holds every score and every process's judge counts): all stop together.
    _check_some_pairs(kept, flat_scores, cfg, JudgeStats.from_dict(judge_stats) if judge_stats is not None else None)
    if not engine.is_main:
        engine.wait()
        return run.final

    # 4. rank (dense, ties within tolerance) and expand to pairs
    spec = cfg.reward if isinstance(cfg.reward, str) else json.dumps(cfg.reward, sort_keys=True)
    base = {"stage": STAGE, "reward": cfg.reward, "seed": cfg.run.seed, "k": cfg.k,
            "generation": to_dict(cfg.generation), "tie_tolerance": cfg.tie_tolerance}
    run.final.mkdir(parents=True, exist_ok=True)
    n_pairs = short = 0
    at = 0
    with (run.final / "rankings.jsonl").open("w") as rf, (run.final / "pairs.jsonl").open("w") as pf:
        for group, it in enumerate(kept):
            scores = flat_scores[at:at + len(it.completions)]
            at += len(it.completions)
            ranks = dense_ranks(scores, cfg.tie_tolerance)
            prov = {**base, "model": it.model, "prompt_id": it.id, "source": it.loc}
            tag = {"kind": it.kind} if it.kind else {}
            rf.write(json.dumps({"prompt": it.prompt, **tag, "completions": it.completions,
                                 "rankings": [{"labeler": spec, "ranks": ranks}], "scores": scores,
                                 "provenance": prov}) + "\n")
            pairs, n_short = ranking_pairs(scores, ranks, cfg.min_gap)
            short += n_short
            for best, worst in pairs:
                margin = {"score_gap": scores[best] - scores[worst], "rank_gap": float(ranks[worst] - ranks[best]),
                          "none": None}[cfg.margin]
                row = {"prompt": it.prompt, **tag, "chosen": it.completions[best],
                       "rejected": it.completions[worst]}
                if margin is not None:
                    row["margin"] = margin
                row["provenance"] = {**prov, "group": group, "scores": [scores[best], scores[worst]],
                                     "ranks": [ranks[best], ranks[worst]]}
                pf.write(json.dumps(row) + "\n")
                n_pairs += 1

    # 5. summary: counts, so that nothing is dropped silently
    summary = {**counts, "ranked": len(kept), "pairs": n_pairs, "pairs_below_min_gap": short,
               "mean_score": sum(flat_scores) / len(flat_scores), "seconds": round(time.time() - started, 1)}
    if judge_stats is not None:
        summary["judge"] = judge_stats
    (run.final / "summary.json").write_text(json.dumps(summary, indent=2))
    run.mark_done(summary)
    dropped = counts["dropped_empty"] + counts["dropped_duplicate"]
    print(f"alignkit label-ai: {len(kept)} prompts ranked by {spec} -> {n_pairs} pairs in {run.final}"
          + (f"; dropped {dropped} empty/repeated completions" if dropped else "")
          + (f", skipped {counts['prompts_skipped']} prompts with < 2 distinct completions"
             if counts["prompts_skipped"] else "")
          + (f", {short} pairs under min_gap" if short else ""))
    if judge_stats is not None and hasattr(stats, "summary"):  # every process's judgements, counted together
        total = JudgeStats.from_dict(judge_stats)
        print(f"alignkit label-ai: judge: {total.summary('judgements')}")
        warning = total.warning("judgement", "got the judge's fallback score",
                                "the rankings and pairs say little about the completions")
        if warning:
            print(f"alignkit label-ai: warning: {warning}")
    engine.wait()
    return run.final
