"""Train a reward model on preference pairs or rankings (Bradley-Terry).

    alignkit rm --config configs/rm-tiny.yaml                   # seconds, a tiny random model
    alignkit rm --config configs/rm.yaml                        # MiniLM-L6 on polite-vs-rude pairs
    alignkit rm --config configs/rm-smollm2.yaml                # SmolLM2-135M backbone, LoRA

A reward model is the backbone with a one-output regression head in place of
the LM head (``AutoModelForSequenceClassification``, ``num_labels=1``): causal
LMs read the score at the last non-pad token of prompt + response, encoders at
the pooled output. Input layout: :class:`alignkit.rewards.model.RMInput`.

Loss (InstructGPT eq. 1, Llama 2 eq. 2): ``-log sigmoid(r_c - r_r - m)`` with the
data's margin ``m`` when ``use_margin`` (times ``margin_scale``), plus
``centering_coef * mean((r_c + r_r)^2)`` (Eisenstein et al. 2023) when > 0.

Data (``data.path``): pair files, Anthropic HH, rankings (expanded to C(K,2)
pairs), hub datasets, or ``synthetic:polite_vs_rude?n=2000`` /
``synthetic:rankings?n=500&k=4``. The pairs of one ranking form one unit that
is never split, neither between batches nor between train and held-out:
``train.batch_size`` counts units (a pair, or a whole ranking), as InstructGPT
batches all comparisons of a prompt together. Each distinct completion of a
micro-batch goes through the model once.

Held-out metrics (``data.eval_path`` or ``data.eval_fraction``): accuracy (a tie
counts as wrong, as in RewardBench) and mean score margin. After training, the
mean and std of the scores of up to ``norm_samples`` reference responses (the
held-out responses, else a sample of the training ones) are stored in
``final/alignkit.json``, so ``rm:PATH?normalize=true`` can return z-scores.
``final/`` loads with ``AutoModelForSequenceClassification`` and in
``pipeline("text-classification", function_to_apply="none")``.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from alignkit.config import (DataConfig, ModelConfig, RunConfig, TrainConfig, check_held_out, check_warmup, opt,
                             reject_unused)
from alignkit.data.collate import length_chunks
from alignkit.data.formats import (AGGREGATION_RULES, PreferencePair, load_preferences, parse_preference,
                                   parse_ranking, ranking_to_pairs)
from alignkit.data.io import ErrorPolicy
from alignkit.errors import AlignkitError, ConfigError, DataError
from alignkit.losses import pairwise_loss, reward_centering_loss
from alignkit.data.split import split_off
from alignkit.data.synthetic import synthetic_records
from alignkit.models import load_sequence_scorer, load_tokenizer
from alignkit.rewards.model import META_FILE, RMInput, normalisation_stats, score_batch, score_encoded
from alignkit.runs import RunDir, config_hash, run_dir_at
from alignkit.shared_prefix import can_share_prefixes, common_prefix, prefix_forward
from alignkit.training import (Engine, build_optimizer, build_scheduler, step_batches, steps_per_epoch, total_steps,
                               trainable_parameters)

STAGE = "rm"
PREFERENCE_FORMATS = ("auto", "preference", "hh", "ranking")
# texts per forward pass inside a micro-batch (see score_pairs): a step of 8 pairs (16 texts) takes
# 0.57 s forward + backward in one chunk, 0.43 s in chunks of 8 and 0.46 s in chunks of 4 with
# MiniLM-L6; 4.60 s, 3.71 s and 4.16 s with SmolLM2 and LoRA (2 CPU cores)
SCORE_CHUNK = 8


@dataclass
class Config:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="builtin:minilm-l6"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    layout: str = opt("auto", choices=("auto", "chat", "pair"),
                      help="chat: template prompt + response + EOS (causal LMs); pair: text pair (encoders)")
    aggregate: str = opt("per_labeler", choices=AGGREGATION_RULES, help="how rankings of several labelers combine")
    use_margin: bool = opt(False, help="subtract the data's margin (rank gap, preference strength) in the loss")
    margin_scale: float = opt(1.0, ge=0, help="margin used = margin_scale * the record's margin")
    centering_coef: float = opt(0.0, ge=0, help="reward centering: coef * mean((r_c + r_r)^2); 0.01 in "
                                                "Eisenstein et al. 2023")
    norm_samples: int = opt(1000, ge=2, help="reference responses scored for the stored mean/std")


# --------------------------------------------------------------------------- data


def _load_pairs(path: str, cfg: Config) -> list[PreferencePair]:
    data = cfg.data
    if not path.startswith("synthetic:"):
        fmt = "auto" if data.format == "auto" else data.format
        return load_preferences(path, data.split, data.on_error, fmt, cfg.aggregate, data.limit, data.kind)
    records = synthetic_records(path, kind=data.kind)
    records = records[:data.limit] if data.limit else records
    pairs: list[PreferencePair] = []
    for group, rec in enumerate(records):
        if "completions" in rec.data:
            pairs += ranking_to_pairs(parse_ranking(rec), cfg.aggregate, group=group)
        else:
            pairs.append(parse_preference(rec))
    return pairs


def units_of(pairs: list[PreferencePair]) -> list[list[int]]:
    """Pair indices grouped into units: one per ranking (same ``group``), one per lone pair."""
    units: list[list[int]] = []
    by_group: dict[int, list[int]] = {}
    for i, p in enumerate(pairs):
        if p.group < 0:
            units.append([i])
        elif p.group in by_group:
            by_group[p.group].append(i)
        else:
            by_group[p.group] = [i]
            units.append(by_group[p.group])
    return units


def load_pairs(cfg: Config) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Training and held-out pairs; a ranking's pairs stay on one side of the split."""
    if cfg.data.format not in PREFERENCE_FORMATS:
        raise ConfigError(f"data.format must be one of {', '.join(PREFERENCE_FORMATS)} for alignkit rm, "
                          f"got '{cfg.data.format}'")
    if not cfg.data.path:
        raise ConfigError("data.path is empty: give a preference or ranking file, a hub dataset or "
                          "synthetic:polite_vs_rude")
    pairs = _load_pairs(cfg.data.path, cfg)
    if cfg.data.eval_path:
        return pairs, _load_pairs(cfg.data.eval_path, cfg)
    train_units, eval_units = split_off(units_of(pairs), cfg.data.eval_fraction, cfg.run.seed)
    return [pairs[i] for u in train_units for i in u], [pairs[i] for u in eval_units for i in u]


@dataclass
class EncodedPairs:
    """Each distinct (prompt, response) encoded once; pairs point into ``texts``."""

    texts: list[dict]
    chosen: list[int]
    rejected: list[int]
    margins: list[float]
    units: list[list[int]]


def encode_pairs(rm_input: RMInput, pairs: list[PreferencePair], on_error: str) -> EncodedPairs:
    policy = ErrorPolicy(on_error)
    index: dict[tuple, int] = {}
    out = EncodedPairs([], [], [], [], [])
    kept: list[PreferencePair] = []

    def text_id(enc: dict) -> int:
        key = tuple(itertools.chain.from_iterable(enc[k] for k in sorted(enc)))
        if key not in index:
            index[key] = len(out.texts)
            out.texts.append(enc)
        return index[key]

    for p in pairs:
        policy.total += 1
        try:
            c = rm_input.encode(p.prompt, p.chosen, loc=p.loc, field="chosen")
            r = rm_input.encode(p.prompt, p.rejected, loc=p.loc, field="rejected")
        except DataError as e:
            policy.handle(e)
            continue
        out.chosen.append(text_id(c))
        out.rejected.append(text_id(r))
        out.margins.append(p.margin if p.margin is not None else 0.0)
        kept.append(p)
    policy.report("preference pairs")
    out.units = units_of(kept)
    return out


# --------------------------------------------------------------------------- scoring and evaluation


def score_pairs(model, rm_input: RMInput, data: EncodedPairs, pair_ids: list[int]):
    """(r_c, r_r) for the given pairs, each distinct text scored once, with grad.

    With a causal model, texts that start with the same tokens as their pair partner (the
    prompt) run that start once (:func:`score_sharing_prefixes`). The other texts go
    through the model in length-sorted chunks of ``SCORE_CHUNK``
    (:func:`~alignkit.data.collate.length_chunks`): padding every text to the longest
    of the micro-batch costs ~30% more compute on short preference data. The scores are
    the same either way, to float rounding.
    """
    text_ids = sorted({data.chosen[i] for i in pair_ids} | {data.rejected[i] for i in pair_ids})
    scored = score_sharing_prefixes(model, rm_input, data, pair_ids) if can_share_prefixes(model) else {}
    rest = [t for t in text_ids if t not in scored]
    for rows in length_chunks([len(data.texts[t]["input_ids"]) for t in rest], SCORE_CHUNK):
        scores = score_batch(model, rm_input.collate([data.texts[rest[k]] for k in rows]))
        scored.update((rest[k], scores[j]) for j, k in enumerate(rows))
    chosen = torch.stack([scored[data.chosen[i]] for i in pair_ids])
    rejected = torch.stack([scored[data.rejected[i]] for i in pair_ids])
    return chosen, rejected


def score_sharing_prefixes(model, rm_input: RMInput, data: EncodedPairs, pair_ids: list[int]) -> dict:
    """``{text id: score}`` for the texts of these pairs that share a start with another of them.

    Each text's start is what it has in common with every partner it has here (a
    ranking's texts have several); texts with the same start run it once
    (:func:`~alignkit.shared_prefix.prefix_forward`), then their own tokens after it, in
    chunks of ``SCORE_CHUNK``. A start no other text shares gains nothing: that text is
    left out, to be scored whole.
    """
    ids = lambda t: data.texts[t]["input_ids"]  # noqa: E731
    start: dict[int, int] = {}
    for i in pair_ids:
        c, r = data.chosen[i], data.rejected[i]
        if c != r:
            n = common_prefix(ids(c), ids(r))
            start[c], start[r] = min(start.get(c, n), n), min(start.get(r, n), n)
    groups: dict[tuple, list[int]] = {}
    for t, n in start.items():
        if n:
            groups.setdefault(tuple(ids(t)[:n]), []).append(t)
    groups = {prefix: texts for prefix, texts in groups.items() if len(texts) > 1}
    if not groups:
        return {}
    prefixes = [list(prefix) for prefix in groups]
    texts = [t for members in groups.values() for t in members]
    owner = [g for g, members in enumerate(groups.values()) for _ in members]
    suffixes = [ids(t)[len(prefixes[g]):] for t, g in zip(texts, owner)]
    run = prefix_forward(model, prefixes, suffixes, owner, rm_input.tok.pad_token_id, SCORE_CHUNK)
    if run is None:
        return {}
    scored = {}
    for c in run[1]:
        scored.update((texts[k], c.out.logits[j, 0].float()) for j, k in enumerate(c.rows))
    return scored


@torch.no_grad()
def evaluate(model, rm_input: RMInput, data: EncodedPairs, batch_size: int,
             engine=None) -> tuple[dict, np.ndarray]:
    """Held-out loss, accuracy (ties wrong) and mean margin; also every text's score.

    Each process scores its share of the texts (length-sorted batches carry little
    padding); every process gets all scores.
    """
    from alignkit.training import SingleProcess

    engine = engine or SingleProcess()
    scorer = engine.unwrap(model)
    was_training = scorer.training
    scorer.eval()
    order = sorted(range(len(data.texts)), key=lambda i: len(data.texts[i]["input_ids"]))
    mine: list[tuple[int, float]] = []
    for batch, weight in engine.eval_batches(order, batch_size):
        scores = score_batch(scorer, rm_input.collate([data.texts[i] for i in batch])).cpu().tolist()
        if weight:
            mine += list(zip(batch, scores))
    scorer.train(was_training)
    scores = np.zeros(len(data.texts), dtype=np.float64)
    for i, score in engine.gather(mine):
        scores[i] = score
    r_c = torch.tensor(scores[data.chosen])
    r_r = torch.tensor(scores[data.rejected])
    _, m = pairwise_loss(r_c, r_r)
    metrics = {"eval_loss": m["loss"], "eval_accuracy": m["accuracy"], "eval_margin": m["score_margin"],
               "eval_pairs": len(data.chosen)}
    return metrics, scores


# --------------------------------------------------------------------------- training


def train_rm(cfg: Config, pairs: list[PreferencePair], run_dir: RunDir | str | Path,
             eval_pairs: list[PreferencePair] | None = None, resume: bool = False,
             engine: Engine | None = None) -> Path:
    """Train on ``pairs``; returns the final reward-model folder (``run_dir/final``)."""
    run = run_dir if isinstance(run_dir, RunDir) else run_dir_at(run_dir)

    # -- setup: tokenizer, scorer, encoded pairs
    engine = engine or Engine(cfg.train.mixed_precision, seed=cfg.run.seed)
    tok = load_tokenizer(cfg.model.name, cfg.model.cache_dir, padding_side="right")
    model = engine.place(load_sequence_scorer(cfg.model, tokenizer=tok))
    rm_input = RMInput(tok, cfg.layout, cfg.data.max_length)
    train = encode_pairs(rm_input, pairs, cfg.data.on_error)
    held = encode_pairs(rm_input, eval_pairs, cfg.data.on_error) if eval_pairs else None
    if held is not None and not held.chosen:  # every held-out pair skipped (on_error=skip)
        held = None
    if not train.units:
        raise AlignkitError("alignkit rm: no usable training pairs")
    optimizer = build_optimizer(trainable_parameters(model), cfg.train)
    model, optimizer, scheduler = engine.prepare(model, optimizer, build_scheduler(optimizer, cfg.train), cfg.train)
    n_units, n_procs = len(train.units), engine.num_processes
    last_step = total_steps(n_units, cfg.train, n_procs)
    check_warmup(cfg.train, last_step)
    spe = steps_per_epoch(n_units, cfg.train, n_procs)
    eval_batch = cfg.train.batch_size * 2
    start = engine.start(run, cfg, last_step, resume, model)
    if start.done:
        return run.final
    metrics: dict[str, float] = {}
    held_scores = None

    model.train()
    bar, task = engine.progress(last_step, "rm")
    step = start.step + 1
    try:
        with bar:
            bar.update(task, completed=start.step)
            for step, micro in step_batches(n_units, cfg.train, cfg.run.seed, start.step, n_procs):
                n_pairs = sum(len(train.units[u]) for unit_ids in micro for u in unit_ids)  # all processes
                sums: dict[str, float] = {}
                for share in engine.micro_batches(model, micro):
                    pair_ids = [i for u in share.items for i in train.units[u]]
                    # 1. score: each distinct completion once
                    r_c, r_r = score_pairs(model, rm_input, train, pair_ids)
                    # 2. Bradley-Terry loss with the optional margin, plus optional centering
                    margin = None
                    if cfg.use_margin:
                        margin = cfg.margin_scale * torch.tensor([train.margins[i] for i in pair_ids],
                                                                 device=r_c.device)
                    loss, m = pairwise_loss(r_c, r_r, margin)
                    if cfg.centering_coef > 0:
                        penalty, pm = reward_centering_loss(r_c, r_r)
                        loss = loss + cfg.centering_coef * penalty
                        m.update(pm)
                    # 3. backward, weighted by the share's part of the step's pairs
                    share_of_step = len(pair_ids) / n_pairs * share.weight
                    engine.backward(loss * share_of_step)
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + v * share_of_step

                # 4. clip, check and update
                lr, grad_norm = engine.step(model, optimizer, scheduler, cfg.train, step)

                # 5. log, evaluate, checkpoint
                metrics = {**engine.reduce_sum(sums), "pairs": n_pairs, "grad_norm": grad_norm, "lr": lr,
                           "epoch": step / spe}
                if held and ((cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == last_step):
                    eval_metrics, held_scores = evaluate(model, rm_input, held, eval_batch, engine)
                    metrics.update(eval_metrics)
                if step % cfg.train.log_every == 0 or step == last_step or "eval_loss" in metrics:
                    engine.log(step, metrics)
                if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == last_step:
                    engine.save_checkpoint(run, step, cfg.train)
                bar.update(task, advance=1, info=f"loss {metrics['loss']:.3f} acc {metrics['accuracy']:.2f}")
    except AlignkitError as e:
        raise engine.stopped(run, step, e) from None
    finally:
        engine.close_log()

    # -- normalisation statistics on reference responses, then the final model
    if held and held_scores is None:  # resumed at the very end: nothing ran
        eval_metrics, held_scores = evaluate(model, rm_input, held, eval_batch, engine)
        metrics.update(eval_metrics)
    if held_scores is not None:
        reference = held_scores[:cfg.norm_samples]
    else:
        ids = list(range(len(train.texts)))
        random.Random(cfg.run.seed).shuffle(ids)
        reference = score_encoded(engine.unwrap(model), rm_input, [train.texts[i] for i in ids[:cfg.norm_samples]],
                                  eval_batch)
    stats = normalisation_stats(reference)
    summary = {"steps": last_step, "train_loss": metrics.get("loss"), "train_accuracy": metrics.get("accuracy"),
               **{k: v for k, v in metrics.items() if k.startswith("eval_")}}
    model.eval()
    meta = {"kind": "reward_model", "backbone": cfg.model.name, "lora": cfg.model.lora.enabled,
            "input": rm_input.describe(), **stats, "config_hash": config_hash(cfg), **summary}
    engine.save_final(model, tok, run.final, extra=meta)
    engine.finish(run, summary)
    return run.final


def check_config(cfg: Config) -> None:
    """Settings alignkit rm would not read."""
    reject_unused(cfg, {"data.max_prompt_length": "by alignkit rm: data.max_length bounds prompt + response"})
    if not cfg.use_margin:
        reject_unused(cfg, {"margin_scale": "without use_margin=true (the loss then ignores margins)"})
    check_held_out(cfg.data, cfg.train)


def main(cfg: Config, resume: bool = False) -> Path:
    check_config(cfg)
    pairs, eval_pairs = load_pairs(cfg)
    run = RunDir(cfg.run.output_dir, cfg.run.name, STAGE)
    engine = Engine(cfg.train.mixed_precision, seed=cfg.run.seed)
    final = train_rm(cfg, pairs, run, eval_pairs=eval_pairs, resume=resume, engine=engine)
    if engine.is_main:
        meta = json.loads((final / META_FILE).read_text())
        shown = ", ".join(f"{k} {meta[k]:.3f}" for k in ("eval_accuracy", "eval_margin") if meta.get(k) is not None)
        print(f"alignkit rm: {len(pairs)} pairs -> {final}" + (f" ({shown})" if shown else ""))
    return final
