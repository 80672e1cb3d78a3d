"""DPO and relatives: optimise the policy on preference data directly, no reward model, no sampling.

    alignkit dpo --config configs/dpo-tiny.yaml
    alignkit dpo --config configs/dpo.yaml data.path=prefs.jsonl loss.type=ipo loss.beta=0.5
    alignkit dpo --config configs/dpo.yaml --resume

Rafailov et al. 2023: beta * log(pi(y|x) / ref(y|x)) is an implicit reward, and the
Bradley-Terry loss on it trains the policy as its own reward model. ``loss.type`` picks

- ``dpo``  (``loss.label_smoothing`` > 0: conservative DPO),
- ``ipo``  (squared loss; does not push the margin to infinity),
- ``simpo`` (reference-free, length-normalised, target margin ``loss.simpo_gamma``),
- ``kto``  (unpaired thumbs-up / thumbs-down data ``{prompt, completion, label}``;
  preference pairs are split into a desirable and an undesirable example).

Data (``data.path``): preference pairs (text or chat), Anthropic HH transcripts, rankings
(expanded to pairs), KTO records, a hub dataset, or ``synthetic:polite_vs_rude?n=2000``.
Held-out reward accuracy comes from ``data.eval_path`` or a ``data.eval_fraction`` split.

The reference is the initial policy. Its log-probabilities are computed once, before
training, and cached in the run folder (``ref_logps.safetensors``, one row per
example, keyed by a hash of the token ids, the model config and its weights), so no
second model is kept and no reference forward runs during training; ``--resume``
reuses the cache. With LoRA the cache is computed with the adapter disabled, which
is the initial policy too (LoRA's B matrix starts at zero): caching costs one pass
over the data instead of one extra forward per step.

Run folder ``runs/NAME/dpo/``: config.yaml, ref_logps.safetensors, metrics.jsonl
(``loss``, ``chosen_reward``, ``rejected_reward``, ``reward_accuracy``,
``reward_margin``; ``eval_...`` for the held-out set), tb/, checkpoints/, final/, DONE.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config import (DataConfig, ModelConfig, RunConfig, TrainConfig, check_held_out, check_warmup, opt,
                             reject_unused, to_dict)
from alignkit.data.collate import (Encoded, collate, encode_example, encode_prompt, encode_response, length_chunks,
                                   record_error, response_logits)
from alignkit.data.formats import (KTOExample, PreferencePair, detect_file_format, load_kto, load_preferences,
                                   parse_preference, parse_ranking, ranking_to_pairs)
from alignkit.errors import AlignkitError, DataError
from alignkit.losses import dpo_loss, ipo_loss, kto_loss, kto_reference_point, sequence_logprobs, simpo_loss, token_logprobs
from alignkit.models import adapter_disabled, is_peft, load_causal_lm, load_tokenizer
from alignkit.runs import RunDir
from alignkit.shared_prefix import can_share_prefixes, prefix_forward
from alignkit.training import (Engine, SingleProcess, build_optimizer, build_scheduler, step_batches, steps_per_epoch,
                               total_steps, trainable_parameters)

STAGE = "dpo"
REF_CACHE = "ref_logps.safetensors"
# sequences per forward pass inside a micro-batch, length-sorted (see sequence_logps): with SmolLM2
# and LoRA, batch 4 pairs, a forward + backward takes 2.87 s in one chunk of 8, 2.44 s in chunks of
# 4 and 2.68 s in chunks of 2 (2 CPU cores)
FORWARD_CHUNK = 4
# preference pairs whose prompts run in one forward when chosen and rejected share it (see sequence_logps)
PAIRS_PER_CHUNK = 8


# --------------------------------------------------------------------------- config


@dataclass
class LossConfig:
    type: str = opt("dpo", choices=("dpo", "ipo", "simpo", "kto"))
    beta: float = opt(0.1, gt=0, help="dpo/ipo/kto: strength of the implicit KL constraint; simpo: reward scale")
    label_smoothing: float = opt(0.0, ge=0, lt=0.5, help="dpo only: conservative DPO's label-flip probability "
                                                       "(0.5: coin-flip labels, nothing to learn)")
    simpo_gamma: float = opt(0.5, ge=0, help="simpo only: target reward margin")
    average_logprobs: bool = opt(False, help="dpo/ipo/kto: mean instead of sum of token log-probs "
                                             "(simpo always length-normalises)")
    kto_desirable_weight: float = opt(1.0, gt=0)
    kto_undesirable_weight: float = opt(1.0, gt=0)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(format="auto"))
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=5e-6, batch_size=8))
    run: RunConfig = field(default_factory=RunConfig)


# --------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    """Two tokenised sequences that share a prompt and go through the model together.

    For pairs, ``a`` is chosen and ``b`` rejected. For KTO, ``a`` is the labelled
    completion and ``b`` this prompt with *another* example's completion: the
    mismatched pair that KTO's reference point z0 is estimated from.
    """

    a: Encoded
    b: Encoded
    label: bool = True  # KTO: desirable
    loc: str = ""


def _load_records(path: str, data: DataConfig, kto: bool) -> list:
    """Preference pairs, or KTO examples when the loss is KTO (pairs are split in two)."""
    if path.startswith("synthetic:"):
        return _synthetic_pairs(path, data)
    fmt = data.format
    if fmt == "auto":  # peek at the first record that parses: KTO files load differently
        fmt = {"kto": "kto", "sft": "sft", "prompts": "prompts"}.get(detect_file_format(path, data.split), "auto")
    if fmt in ("sft", "prompts"):
        raise AlignkitError(f"{path}: {fmt} records are not preference data; give prompt/chosen/rejected pairs, "
                            f"HH transcripts, rankings or (with loss.type=kto) prompt/completion/label")
    if fmt == "kto":
        if not kto:
            raise AlignkitError(f"{path}: these are KTO records (prompt, completion, label); "
                                f"they need loss.type=kto")
        return load_kto(path, data.split, data.on_error, data.limit, kind=data.kind)
    return load_preferences(path, data.split, data.on_error, fmt, limit=data.limit, kind=data.kind)


def _synthetic_pairs(path: str, data: DataConfig) -> list[PreferencePair]:
    """``synthetic:polite_vs_rude?n=..&seed=..`` (or ``synthetic:rankings``), as alignkit rm reads them."""
    from alignkit.data.synthetic import synthetic_records

    records = synthetic_records(path, kind=data.kind)
    pairs: list[PreferencePair] = []
    for group, rec in enumerate(records[:data.limit] if data.limit else records):
        if "completions" in rec.data:
            pairs += ranking_to_pairs(parse_ranking(rec), group=group)
        else:
            pairs.append(parse_preference(rec))
    return pairs


def _split_held_out(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``fraction`` of the records; pairs from one ranking stay on one side."""
    groups: dict = {}
    for i, r in enumerate(records):
        key = r.group if isinstance(r, PreferencePair) and r.group >= 0 else ("record", i)
        groups.setdefault(key, []).append(r)
    units = list(groups.values())
    random.Random(seed).shuffle(units)
    n_eval = max(1, round(len(units) * fraction))
    if n_eval >= len(units):
        raise AlignkitError(f"data.eval_fraction={fraction} leaves no training data ({len(units)} records)")
    held = [r for unit in units[:n_eval] for r in unit]
    kept = [r for unit in units[n_eval:] for r in unit]
    return kept, held


def _unpair(records: list) -> list[KTOExample]:
    """KTO on preference pairs: chosen is a desirable example, rejected an undesirable one."""
    out = []
    for r in records:
        if isinstance(r, PreferencePair):
            out += [KTOExample(r.prompt, r.chosen, True, r.loc), KTOExample(r.prompt, r.rejected, False, r.loc)]
        else:
            out.append(r)
    return out


def _check_prompt(prompt_ids: list[int], data: DataConfig, loc: str) -> None:
    if len(prompt_ids) > data.max_prompt_length:
        raise record_error(loc, "prompt", f"prompt is {len(prompt_ids)} tokens, over "
                                          f"data.max_prompt_length={data.max_prompt_length}")


def _encode(records: list, tok, data: DataConfig, kto: bool) -> list[Example]:
    """Tokenise once; too-long records are errors (or skipped, counted, with data.on_error=skip)."""
    out, skipped, first_error = [], 0, None
    for i, r in enumerate(records):
        try:
            prompt_ids = encode_prompt(tok, r.prompt, r.loc)
            _check_prompt(prompt_ids, data, r.loc)
            if kto:
                a = encode_example(tok, r.prompt, r.completion, data.max_length, r.loc, "completion", prompt_ids)
                other = records[_other_prompt(records, i)].completion
                out.append(Example(a, _mismatched(tok, prompt_ids, other, data.max_length), r.label, r.loc))
            else:
                a = encode_example(tok, r.prompt, r.chosen, data.max_length, r.loc, "chosen", prompt_ids)
                b = encode_example(tok, r.prompt, r.rejected, data.max_length, r.loc, "rejected", prompt_ids)
                out.append(Example(a, b, True, r.loc))
        except DataError as e:
            if data.on_error == "raise":
                raise
            skipped, first_error = skipped + 1, first_error or e
    if skipped:
        print(f"alignkit: skipped {skipped} of {len(records)} records over the length limits (first: {first_error})")
    if not out:
        raise AlignkitError("no usable preference records within data.max_length")
    return out


def _other_prompt(records: list, i: int) -> int:
    """The next record (cyclically) with another prompt: KTO's mismatched completion for record i.

    Pairs split for KTO sit side by side with one prompt, so plain i + 1 would
    often pair a prompt with its own other answer, which is no mismatch.
    """
    n = len(records)
    for step in range(1, min(n, 64)):  # bounded: a file of one prompt must not cost O(n^2)
        j = (i + step) % n
        if records[j].prompt != records[i].prompt:
            return j
    return (i + 1) % n


def _mismatched(tok, prompt_ids: list[int], completion: str, max_length: int) -> Encoded:
    # Only a KL estimate reads this sequence, so cutting it to fit is harmless,
    # whereas an error here would blame a record that is fine on its own.
    room = max(1, max_length - len(prompt_ids))
    return Encoded(prompt_ids + encode_response(tok, completion)[:room], len(prompt_ids))


def load_examples(cfg: Config, tok) -> tuple[list[Example], list[Example]]:
    """Training and held-out examples (data.eval_path, else a data.eval_fraction share)."""
    kto = cfg.loss.type == "kto"
    if not cfg.data.path:
        raise AlignkitError("data.path is empty: give a preference file or dataset (data.path=prefs.jsonl)")
    train = _load_records(cfg.data.path, cfg.data, kto)
    held: list = []
    if cfg.data.eval_path:
        held = _load_records(cfg.data.eval_path, cfg.data, kto)
    elif cfg.data.eval_fraction > 0:
        train, held = _split_held_out(train, cfg.data.eval_fraction, cfg.run.seed)
    if kto:
        train, held = _unpair(train), _unpair(held)
    return _encode(train, tok, cfg.data, kto), (_encode(held, tok, cfg.data, kto) if held else [])


# --------------------------------------------------------------------------- log-probabilities


@dataclass
class SequenceLogps:
    """Per-example log-probs of the two sequences and their response-token counts, each ``(B,)``."""

    a: torch.Tensor
    b: torch.Tensor
    len_a: torch.Tensor
    len_b: torch.Tensor


def sequence_logps(model, examples: list[Example], pad_id: int, average: bool = False) -> SequenceLogps:
    """Log-probs summed over response tokens only, of both sides of every example.

    An example whose two sequences start with the same prompt runs that prompt once
    (:func:`_shared_prompt_logps`: the prompt's keys and values serve both answers).
    The other sequences go through the model shortest first, in chunks of
    ``FORWARD_CHUNK`` each padded to its own longest (:func:`length_chunks`), not as
    one batch padded to the longest of all, and the LM head runs only where a
    response token is predicted (:func:`response_logits`). The log-probs are the same
    either way, to float rounding.
    """
    device = next(model.parameters()).device
    n = len(examples)
    logps, lengths = torch.zeros(2 * n, device=device), torch.zeros(2 * n, dtype=torch.long, device=device)
    shared = [i for i, e in enumerate(examples) if _same_prompt(e)] if can_share_prefixes(model) else []
    by_length = sorted(shared, key=lambda i: (examples[i].a.prompt_len, i))
    for k in range(0, len(by_length), PAIRS_PER_CHUNK):
        rows = by_length[k:k + PAIRS_PER_CHUNK]
        out = _shared_prompt_logps(model, [examples[i] for i in rows], pad_id, average)
        if out is None:  # the model returned no KV cache: every example goes the unshared way
            shared = []
            break
        at = torch.tensor(rows + [i + n for i in rows], device=device)
        logps = logps.index_put((at,), torch.cat([out[0], out[1]]).to(logps.dtype))
        lengths[at] = torch.cat([out[2], out[3]])
    done = set(shared)
    alone = [i for i in range(n) if i not in done]
    seqs = [examples[i].a for i in alone] + [examples[i].b for i in alone]
    where = alone + [i + n for i in alone]  # row of each of seqs in logps
    for chunk in length_chunks([len(s.input_ids) for s in seqs], FORWARD_CHUNK):
        batch = collate([seqs[j] for j in chunk], pad_id).to(device)
        logits, labels, mask = response_logits(
            model, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}, batch.response_mask)
        at = torch.tensor([where[j] for j in chunk], device=device)
        logps = logps.index_put((at,), sequence_logprobs(token_logprobs(logits, labels), mask,
                                                          average=average).to(logps.dtype))
        lengths[at] = mask.sum(-1)
    return SequenceLogps(logps[:n], logps[n:], lengths[:n], lengths[n:])


def _same_prompt(e: Example) -> bool:
    """Both sequences have answers after one and the same prompt of two tokens or more (truncation can
    make them differ; a one-token prompt leaves nothing to run once)."""
    a, b = e.a, e.b
    return (1 < a.prompt_len == b.prompt_len and len(a.input_ids) > a.prompt_len and len(b.input_ids) > b.prompt_len
            and a.input_ids[:a.prompt_len] == b.input_ids[:b.prompt_len])


def _shared_prompt_logps(model, examples: list[Example], pad_id: int, average: bool):
    """``(a, b, len_a, len_b)`` for examples whose two sequences share their prompt, or None when the
    model gives no KV cache.

    The prompts but their last token run once (:func:`~alignkit.shared_prefix.prefix_forward`,
    for the cache alone); each answer runs after them with its prompt's last token first, whose
    logits predict the answer's first token, in chunks of ``FORWARD_CHUNK``. (All logits come
    from whole chunks: a one-column slice of the prompts' forward reaches the LM head by another
    matmul path for trained than for frozen weights, and rounds differently from the reference's
    forward; see :func:`alignkit.rollout.forward_shared_prompts`.) With SmolLM2's chat
    template a preference pair's prompt is about half of each sequence: this is about a fifth
    fewer tokens a pair, forward and backward, than running each prompt twice.
    """
    device = next(model.parameters()).device
    n = len(examples)
    answers = [seq.input_ids[seq.prompt_len - 1:] for seq in [e.a for e in examples] + [e.b for e in examples]]
    run = prefix_forward(model, [e.a.input_ids[:e.a.prompt_len - 1] for e in examples], answers,
                         [i % n for i in range(2 * n)], pad_id, FORWARD_CHUNK, logits_to_keep=1)
    if run is None:
        return None
    logps = torch.zeros(2 * n, device=device)
    for c in run[1]:  # position t predicts token t+1: the prompt's last token predicts the answer's first
        logps = logps.index_put((torch.tensor(c.rows, device=device),),
                                sequence_logprobs(token_logprobs(c.out.logits[:, :-1], c.ids[:, 1:]), c.mask[:, 1:],
                                                  average=average).to(logps.dtype))
    lengths = torch.tensor([len(r) - 1 for r in answers], device=device)
    return logps[:n], logps[n:], lengths[:n], lengths[n:]


@torch.no_grad()
def compute_reference_logps(model, examples: list[Example], pad_id: int, batch_size: int,
                            average: bool = False, engine=None) -> dict[str, torch.Tensor]:
    """Reference log-probs of every example, ``{"a": (N,), "b": (N,)}``, row i = example i.

    Each process computes its share (similar lengths together: less padding, same
    values); every process gets all rows.
    """
    engine = engine or SingleProcess()
    model = engine.unwrap(model)
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].a.input_ids) + len(examples[i].b.input_ids))
    rows: list[tuple[int, float, float]] = []
    with adapter_disabled(model) if is_peft(model) else contextlib.nullcontext():
        for idx, weight in engine.eval_batches(order, batch_size):
            out = sequence_logps(model, [examples[i] for i in idx], pad_id, average)
            if weight:
                rows += zip(idx, out.a.float().cpu().tolist(), out.b.float().cpu().tolist())
    model.train(was_training)
    a, b = torch.zeros(len(examples)), torch.zeros(len(examples))
    for i, la, lb in engine.gather(rows):
        a[i], b[i] = la, lb
    return {"a": a, "b": b}


def reference_key(cfg: Config, model, splits: dict[str, list[Example]], mixed_precision: str = "no") -> str:
    """What the cached reference depends on: the exact token ids, the model, its initial weights
    and the forward precision."""
    h = hashlib.sha256()
    h.update(json.dumps({"model": to_dict(cfg.model), "average": cfg.loss.average_logprobs,
                         "mixed_precision": mixed_precision}, sort_keys=True).encode())
    for name, examples in splits.items():
        h.update(name.encode())
        for e in examples:
            h.update(json.dumps([e.a.input_ids, e.a.prompt_len, e.b.input_ids, e.b.prompt_len]).encode())
    with torch.no_grad():  # a weights fingerprint: a changed local checkpoint invalidates the cache
        for name, p in model.named_parameters():
            h.update(f"{name}:{p.double().sum().item():.10e}".encode())
    return h.hexdigest()


def cached_reference_logps(cfg: Config, run: RunDir, model, pad_id: int, splits: dict[str, list[Example]],
                           engine=None) -> dict[str, dict[str, torch.Tensor]]:
    """Load the run's reference cache when its key matches; otherwise compute (sharded) and save it."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    engine = engine or SingleProcess()
    path = run.path / REF_CACHE
    key = reference_key(cfg, engine.unwrap(model), splits, getattr(engine, "mixed_precision", "no"))
    if path.exists():
        # derived data: a cache that cannot be read (emptied, cut short, not ours) is computed again
        cached, problem = None, None
        try:
            with safe_open(str(path), "pt") as f:
                stored = (f.metadata() or {}).get("key")
            if stored == key:
                flat = load_file(str(path))
                cached = {s: {"a": flat[f"{s}.a"], "b": flat[f"{s}.b"]} for s in splits}
                for s, examples in splits.items():
                    for side in ("a", "b"):
                        if tuple(cached[s][side].shape) != (len(examples),):
                            raise ValueError(f"'{s}.{side}' holds {tuple(cached[s][side].shape)} values "
                                             f"for {len(examples)} examples")
        except Exception as e:  # noqa: BLE001 - any way a file can be broken; computing it again repairs it
            cached, problem = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
        # every process takes the same branch: computing it again is a collective
        if engine.reduce_max(float(problem is not None)) > 0:
            engine.print(f"alignkit dpo: cannot read the reference cache {path} "
                         f"({problem or 'on another process'}); computing it again")
            cached = None
        if cached is not None:
            return cached
    flat, out = {}, {}
    for split, examples in splits.items():
        if examples:
            out[split] = compute_reference_logps(model, examples, pad_id, cfg.train.batch_size,
                                                 cfg.loss.average_logprobs, engine)
        else:
            out[split] = {"a": torch.zeros(0), "b": torch.zeros(0)}
        flat[f"{split}.a"], flat[f"{split}.b"] = out[split]["a"], out[split]["b"]
    if engine.is_main:
        tmp = path.with_suffix(".tmp")
        save_file(flat, str(tmp), metadata={"key": key})
        tmp.replace(path)
    return out


# --------------------------------------------------------------------------- losses


def _dpo(pol: SequenceLogps, ref: SequenceLogps, labels: torch.Tensor, lc: LossConfig, sum_over_processes):
    return dpo_loss(pol.a, pol.b, ref.a, ref.b, lc.beta, lc.label_smoothing)


def _ipo(pol: SequenceLogps, ref: SequenceLogps, labels: torch.Tensor, lc: LossConfig, sum_over_processes):
    return ipo_loss(pol.a, pol.b, ref.a, ref.b, lc.beta)


def _simpo(pol: SequenceLogps, ref: SequenceLogps | None, labels: torch.Tensor, lc: LossConfig, sum_over_processes):
    return simpo_loss(pol.a, pol.b, pol.len_a, pol.len_b, lc.beta, lc.simpo_gamma)


def _kto(pol: SequenceLogps, ref: SequenceLogps, labels: torch.Tensor, lc: LossConfig, sum_over_processes):
    # from the mismatched half, detached; over the whole micro-batch of every process
    z0 = kto_reference_point(pol.b, ref.b, sum_over_processes)
    return kto_loss(pol.a, ref.a, labels, z0, lc.beta, lc.kto_desirable_weight, lc.kto_undesirable_weight)


LOSSES = {"dpo": _dpo, "ipo": _ipo, "simpo": _simpo, "kto": _kto}
REFERENCE_FREE = {"simpo"}


def batch_loss(model, examples: list[Example], idx: list[int], ref: dict | None, cfg: Config, pad_id: int,
               engine=None, weight: float = 1.0):
    """The configured loss on examples ``idx``: policy forward + cached reference.

    ``engine`` and ``weight`` (0 for a stand-in share) let a statistic over the
    whole micro-batch (KTO's reference point) span every process's share.
    """
    batch = [examples[i] for i in idx]
    # SimPO normalises by length itself, so it always gets summed log-probs.
    average = cfg.loss.average_logprobs and cfg.loss.type not in REFERENCE_FREE
    pol = sequence_logps(model, batch, pad_id, average)
    ref_logps = None
    if ref is not None:
        device = pol.a.device
        ref_logps = SequenceLogps(ref["a"][idx].to(device), ref["b"][idx].to(device), pol.len_a, pol.len_b)
    labels = torch.tensor([e.label for e in batch], device=pol.a.device)
    sum_over_processes = None
    if engine is not None and engine.num_processes > 1:
        def sum_over_processes(total, count):
            sums = engine.reduce_sum({"total": float(total) * weight, "count": float(count) * weight})
            return total.new_tensor(sums["total"]), count.new_tensor(sums["count"])
    return LOSSES[cfg.loss.type](pol, ref_logps, labels, cfg.loss, sum_over_processes)


@torch.no_grad()
def evaluate(model, examples: list[Example], ref: dict | None, cfg: Config, pad_id: int,
             engine=None) -> dict[str, float]:
    """Held-out metrics (reward accuracy for pairs), weighted by batch size, prefixed ``eval_``;
    each process takes its share."""
    engine = engine or SingleProcess()
    scorer = engine.unwrap(model)
    was_training = scorer.training
    scorer.eval()
    totals: dict[str, float] = {}
    for idx, weight in engine.eval_batches(list(range(len(examples))), cfg.train.batch_size):
        _, metrics = batch_loss(scorer, examples, idx, ref, cfg, pad_id, engine, weight)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v * len(idx) * weight
    scorer.train(was_training)
    totals = engine.reduce_sum(totals)
    return {f"eval_{k}": v / len(examples) for k, v in totals.items()}


# --------------------------------------------------------------------------- the recipe


def check_config(cfg: Config) -> None:
    """The loss settings of other loss types, which this one would not read."""
    kind = cfg.loss.type
    unused = {"loss.label_smoothing": ("dpo", "conservative DPO's"), "loss.simpo_gamma": ("simpo", "SimPO's"),
              "loss.kto_desirable_weight": ("kto", "KTO's"), "loss.kto_undesirable_weight": ("kto", "KTO's")}
    reject_unused(cfg, {key: f"by loss.type={kind}: it is {whose} setting (loss.type={owner})"
                        for key, (owner, whose) in unused.items() if owner != kind})
    check_held_out(cfg.data, cfg.train)


def main(cfg: Config, resume: bool = False) -> dict:
    check_config(cfg)
    engine = Engine(cfg.train.mixed_precision, seed=cfg.run.seed)
    run = RunDir(cfg.run.output_dir, cfg.run.name, STAGE)
    tok = load_tokenizer(cfg.model.name, cfg.model.cache_dir, padding_side="right")
    train_set, eval_set = load_examples(cfg, tok)
    # rl=True turns dropout off: with dropout the policy's log-probs at step 0
    # would differ from the (dropout-free) cached reference, and the loss would
    # not start at log 2.
    model = engine.place(load_causal_lm(cfg.model, trainable=True, rl=True, tokenizer=tok))
    optimizer = build_optimizer(trainable_parameters(model), cfg.train)
    model, optimizer, scheduler = engine.prepare(model, optimizer, build_scheduler(optimizer, cfg.train), cfg.train)
    n_procs = engine.num_processes
    n_steps = total_steps(len(train_set), cfg.train, n_procs)
    check_warmup(cfg.train, n_steps)
    spe = steps_per_epoch(len(train_set), cfg.train, n_procs)
    pad_id = tok.pad_token_id
    engine.print(f"dpo: {len(train_set)} training and {len(eval_set)} held-out examples, loss {cfg.loss.type}, "
                 f"{n_procs} process(es)")

    # 1. reference log-probs, once, from the initial policy (before any checkpoint is restored),
    #    in the precision the training forwards use
    ref = {"train": None, "eval": None}
    if cfg.loss.type not in REFERENCE_FREE:
        t0 = time.time()
        ref = cached_reference_logps(cfg, run, model, pad_id, {"train": train_set, "eval": eval_set}, engine)
        engine.print(f"dpo: reference log-probs ready ({time.time() - t0:.1f} s)")

    start = engine.start(run, cfg, n_steps, resume, model)
    if start.done:
        return json.loads((run.path / "DONE").read_text() or "{}")
    bar, task = engine.progress(n_steps, "dpo")
    started = time.time()
    eval_metrics: dict[str, float] = {}
    step = start.step + 1
    model.train()
    try:
        with bar:
            bar.update(task, completed=start.step)
            for step, micro in step_batches(len(train_set), cfg.train, cfg.run.seed, start.step, n_procs):
                # 2. policy log-probs of a and b in one forward; 3. loss against the cached reference
                n_in_step = sum(len(mb) for mb in micro)  # all processes
                sums: dict[str, float] = {}
                for share in engine.micro_batches(model, micro):
                    loss, metrics = batch_loss(model, train_set, share.items, ref["train"], cfg, pad_id, engine,
                                               share.weight)
                    # Each loss is a mean over the share: weight by its part of the step.
                    part = len(share.items) / n_in_step * share.weight
                    engine.backward(loss * part)
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + v * part
                # 4. clip, check and update
                lr, grad_norm = engine.step(model, optimizer, scheduler, cfg.train, step)
                # 5. log, evaluate, checkpoint
                row = engine.reduce_sum(sums)
                row.update(pairs=n_in_step, grad_norm=grad_norm, lr=lr, epoch=step / spe,
                           seconds=round(time.time() - started, 2))
                if eval_set and ((cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == n_steps):
                    eval_metrics = evaluate(model, eval_set, ref["eval"], cfg, pad_id, engine)
                    row.update(eval_metrics)
                if step % cfg.train.log_every == 0 or step == n_steps or "eval_loss" in row:
                    engine.log(step, row)
                if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == n_steps:
                    engine.save_checkpoint(run, step, cfg.train)
                bar.update(task, completed=step, info=f"loss {row['loss']:.4f}")
    except AlignkitError as e:
        raise engine.stopped(run, step, e) from None
    finally:
        engine.close_log()

    if eval_set and not eval_metrics:  # resumed at the very end: nothing ran
        eval_metrics = evaluate(model, eval_set, ref["eval"], cfg, pad_id, engine)
    model.eval()
    engine.save_final(model, tok, run.final, extra={"stage": STAGE, "base": cfg.model.name, "loss": cfg.loss.type})
    summary = {"steps": n_steps, "train_seconds": round(time.time() - started, 1),
               "examples": len(train_set), **eval_metrics}
    engine.finish(run, summary)
    engine.print(f"dpo: saved {run.final}" + (f"; held-out reward accuracy {eval_metrics['eval_reward_accuracy']:.3f}"
                                               if "eval_reward_accuracy" in eval_metrics else ""))
    return summary
