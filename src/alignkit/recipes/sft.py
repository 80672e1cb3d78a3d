"""Supervised fine-tuning on demonstrations: the loss on response tokens only.

    alignkit sft --config configs/sft-tiny.yaml                 # seconds, a tiny random model
    alignkit sft --config configs/sft.yaml                      # SmolLM2-135M-Instruct, LoRA
    alignkit sft --config configs/sft.yaml train.max_steps=40 --resume

Data (``data.path``): an SFT file (``{"prompt", "completion"}`` or ``{"messages"}``),
a hub dataset, or ``synthetic:polite_vs_rude?n=2000&seed=0`` (the polite answers of
:func:`alignkit.data.synthetic.polite_vs_rude_pairs` as demonstrations). Held-out
loss and perplexity come from ``data.eval_path`` or a ``data.eval_fraction`` split.

Each example is the chat-template prompt + response + EOS; only response tokens
(and the EOS, so the model learns to stop) carry loss. With ``packing: true``
whole examples are packed (first fit) into rows of up to ``data.max_length`` tokens;
position ids restart at each example, which makes transformers attend within
each example only (a block-diagonal causal mask), so packing changes speed,
not the loss.

Output ``runs/NAME/sft/final``: merged weights that load with
``AutoModelForCausalLM.from_pretrained``, plus ``adapter/`` (a peft adapter) with
LoRA. Other recipes (best-of-N, Constitutional AI) fine-tune on in-memory
examples with :func:`train_sft`. Devices, precision and processes are the
engine's (:mod:`alignkit.training`): ``accelerate launch ... -m alignkit.cli sft``
runs the same loop on N GPUs, ``train.batch_size`` per process.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config import (DataConfig, ModelConfig, RunConfig, TrainConfig, check_held_out, check_warmup, opt,
                             reject_unused)
from alignkit.data.collate import Encoded, collate, encode_example, response_logits
from alignkit.data.formats import SFTExample, load_sft, parse_sft
from alignkit.data.io import ErrorPolicy
from alignkit.data.split import split_off
from alignkit.data.synthetic import synthetic_records
from alignkit.errors import AlignkitError, ConfigError, DataError
from alignkit.losses import sft_loss
from alignkit.models import load_causal_lm, load_tokenizer
from alignkit.runs import RunDir, config_hash, run_dir_at
from alignkit.training import (Engine, build_optimizer, build_scheduler, step_batches, steps_per_epoch, total_steps,
                               trainable_parameters)

STAGE = "sft"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(format="sft"))
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    packing: bool = opt(False, help="pack whole examples into rows of up to data.max_length tokens")


# --------------------------------------------------------------------------- data


def _load_sft(path: str, data: DataConfig) -> list[SFTExample]:
    if path.startswith("synthetic:"):
        examples = [parse_sft(rec) for rec in synthetic_records(path, as_sft=True, kind=data.kind)]
        return examples[:data.limit] if data.limit else examples
    return load_sft(path, data.split, data.on_error, data.limit, kind=data.kind)


def load_demonstrations(data: DataConfig, seed: int) -> tuple[list[SFTExample], list[SFTExample]]:
    """Training and held-out demonstrations as the config describes them."""
    if data.format not in ("auto", "sft"):
        raise ConfigError(f"data.format must be sft (or auto) for alignkit sft, got '{data.format}'")
    if not data.path:
        raise ConfigError("data.path is empty: give an SFT file, a hub dataset or synthetic:polite_vs_rude")
    examples = _load_sft(data.path, data)
    if data.eval_path:
        return examples, _load_sft(data.eval_path, data)
    return split_off(examples, data.eval_fraction, seed)


def encode_all(tokenizer, examples: list[SFTExample], max_length: int, on_error: str) -> list[Encoded]:
    """Tokenise every example; an over-long one is a located DataError (or skipped)."""
    policy = ErrorPolicy(on_error)
    out = []
    for ex in examples:
        policy.total += 1
        try:
            out.append(encode_example(tokenizer, ex.prompt, ex.completion, max_length, ex.loc))
        except DataError as e:
            policy.handle(e)
    policy.report("SFT examples")
    return out


@dataclass(frozen=True)
class PackedRow:
    """Several examples in one row; ``position_ids`` restart at 0 at each example."""

    input_ids: list[int]
    position_ids: list[int]
    response_mask: list[bool]


def pack(encoded: list[Encoded], max_length: int) -> list[PackedRow]:
    """First-fit packing of whole examples into rows of <= max_length tokens.

    Each example goes into the first row with room for it (else a new row), so
    rows fill up better than by cutting the stream in order; no example is split.
    """
    rows: list[tuple[list[int], list[int], list[bool]]] = []
    for e in encoded:
        n = len(e.input_ids)
        row = next((r for r in rows if len(r[0]) + n <= max_length), None)
        if row is None:
            row = ([], [], [])
            rows.append(row)
        row[0].extend(e.input_ids)
        row[1].extend(range(n))
        row[2].extend(e.response_mask)
    return [PackedRow(ids, pos, mask) for ids, pos, mask in rows]


def collate_packed(rows: list[PackedRow], pad_id: int) -> tuple[dict, torch.Tensor]:
    """Model inputs and response mask for packed rows.

    No attention mask: transformers then reads example boundaries from the
    position ids. The padding at the end of a short row is one more segment
    (positions 0, 1, ...), so real tokens never attend to it; it carries no loss.
    """
    width = max(len(r.input_ids) for r in rows)
    ids, pos, mask = [], [], []
    for r in rows:
        fill = width - len(r.input_ids)
        ids.append(r.input_ids + [pad_id] * fill)
        pos.append(r.position_ids + list(range(fill)))
        mask.append(r.response_mask + [False] * fill)
    inputs = {"input_ids": torch.tensor(ids), "position_ids": torch.tensor(pos)}
    return inputs, torch.tensor(mask)


def loss_tokens(unit) -> int:
    """How many of an example's (or packed row's) tokens carry loss (token 0 predicts nothing)."""
    return sum(unit.response_mask[1:])


def make_batch(units: list, pad_id: int) -> tuple[dict, torch.Tensor]:
    """(model inputs, response mask) for a list of Encoded examples or PackedRows."""
    if isinstance(units[0], PackedRow):
        return collate_packed(units, pad_id)
    b = collate(units, pad_id)
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask}, b.response_mask


def response_nll(model, inputs: dict, response_mask: torch.Tensor, num_tokens: float | None = None):
    """``sft_loss`` of one batch: token t+1 is predicted at t; only response tokens count."""
    device = next(model.parameters()).device
    logits, labels, mask = response_logits(model, {k: v.to(device) for k, v in inputs.items()},
                                           response_mask.to(device))
    return sft_loss(logits, labels, mask, num_tokens=num_tokens)


@torch.no_grad()
def evaluate(model, units: list, pad_id: int, batch_size: int, engine=None) -> dict[str, float]:
    """Held-out loss (mean NLL per response token) and perplexity; each process takes its share."""
    from alignkit.training import SingleProcess

    engine = engine or SingleProcess()
    was_training = model.training
    model.eval()
    scorer = engine.unwrap(model)
    total_nll, total_tokens = 0.0, 0.0
    for batch, weight in engine.eval_batches(units, batch_size):
        inputs, mask = make_batch(batch, pad_id)
        # num_tokens=1 turns the token mean into the sum, so batches add up exactly.
        nll_sum, m = response_nll(scorer, inputs, mask, num_tokens=1)
        total_nll += float(nll_sum) * weight
        total_tokens += m["tokens"] * weight
    sums = engine.reduce_sum({"nll": total_nll, "tokens": total_tokens})  # every process's share
    total_nll, total_tokens = sums["nll"], sums["tokens"]
    model.train(was_training)
    mean = total_nll / max(total_tokens, 1.0)
    return {"eval_loss": mean, "eval_perplexity": float(torch.tensor(mean).exp()), "eval_tokens": total_tokens}


# --------------------------------------------------------------------------- training


def train_sft(cfg: Config, examples: list[SFTExample], run_dir: RunDir | str | Path,
              eval_examples: list[SFTExample] | None = None, resume: bool = False,
              model=None, tokenizer=None, engine: Engine | None = None) -> Path:
    """Fine-tune on ``examples``; returns the final model folder (``run_dir/final``).

    ``model``/``tokenizer`` default to ``cfg.model`` loaded fresh; pass them to
    fine-tune a model already in memory (it is trained in place: the unwrapped
    weights are the caller's). ``engine`` defaults to a new one for ``cfg.train``.
    """
    run = run_dir if isinstance(run_dir, RunDir) else run_dir_at(run_dir)
    if not examples:
        raise AlignkitError("alignkit sft: no training examples")

    # -- setup: tokenizer, model, encoded data
    engine = engine or Engine(cfg.train.mixed_precision, seed=cfg.run.seed)
    tok = tokenizer or load_tokenizer(cfg.model.name, cfg.model.cache_dir)
    model = engine.place(model if model is not None else load_causal_lm(cfg.model, tokenizer=tok))
    train_units: list = encode_all(tok, examples, cfg.data.max_length, cfg.data.on_error)
    eval_units: list = encode_all(tok, eval_examples or [], cfg.data.max_length, cfg.data.on_error)
    if not train_units:
        raise AlignkitError("alignkit sft: every training example was skipped")
    counts = {"examples": len(train_units), "skipped_examples": len(examples) - len(train_units)}
    if cfg.packing:
        # Pack in a seeded random order so rows mix the data set; rows are then
        # shuffled per epoch like examples.
        order = list(range(len(train_units)))
        random.Random(cfg.run.seed).shuffle(order)
        train_units = pack([train_units[i] for i in order], cfg.data.max_length)
        eval_units = pack(eval_units, cfg.data.max_length)
    pad_id = tok.pad_token_id
    optimizer = build_optimizer(trainable_parameters(model), cfg.train)
    model, optimizer, scheduler = engine.prepare(model, optimizer, build_scheduler(optimizer, cfg.train), cfg.train)
    n_procs = engine.num_processes
    last_step = total_steps(len(train_units), cfg.train, n_procs)
    check_warmup(cfg.train, last_step)
    spe = steps_per_epoch(len(train_units), cfg.train, n_procs)
    start = engine.start(run, cfg, last_step, resume, model)
    if start.done:
        return run.final
    eval_every = cfg.train.eval_every
    metrics: dict[str, float] = {}

    model.train()
    bar, task = engine.progress(last_step, "sft")
    step = start.step + 1
    try:
        with bar:
            bar.update(task, completed=start.step)
            for step, micro in step_batches(len(train_units), cfg.train, cfg.run.seed, start.step, n_procs):
                # 1. the step's response-token count (all micro-batches, all processes) is the
                #    loss denominator, so 1 x 8 and 8 x 1 accumulation, or 2 processes x 4,
                #    give one gradient
                num_tokens = float(sum(loss_tokens(train_units[i]) for idx in micro for i in idx))

                # 2. forward + backward of this process's share of each micro-batch (sum of NLL / step tokens)
                step_loss = 0.0
                for share in engine.micro_batches(model, micro):
                    inputs, mask = make_batch([train_units[i] for i in share.items], pad_id)
                    loss, _ = response_nll(model, inputs, mask, num_tokens=num_tokens)
                    engine.backward(loss * share.weight)
                    step_loss += float(loss.detach()) * share.weight

                # 3. clip, check and update
                lr, grad_norm = engine.step(model, optimizer, scheduler, cfg.train, step)

                # 4. log, evaluate, checkpoint
                step_loss = engine.reduce_sum({"loss": step_loss})["loss"]
                metrics = {"loss": step_loss, "perplexity": float(torch.tensor(step_loss).exp()),
                           "tokens": num_tokens, "grad_norm": grad_norm, "lr": lr, "epoch": step / spe}
                if eval_units and ((eval_every and step % eval_every == 0) or step == last_step):
                    metrics.update(evaluate(model, eval_units, pad_id, cfg.train.batch_size, engine))
                if step % cfg.train.log_every == 0 or step == last_step or "eval_loss" in metrics:
                    engine.log(step, metrics)
                if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == last_step:
                    engine.save_checkpoint(run, step, cfg.train)
                bar.update(task, advance=1, info=f"loss {step_loss:.3f}")
    except AlignkitError as e:
        raise engine.stopped(run, step, e) from None
    finally:
        engine.close_log()

    # -- the final model (the last step logged the held-out loss)
    if eval_units and "eval_loss" not in metrics:  # resumed at the very end: nothing ran
        metrics.update(evaluate(model, eval_units, pad_id, cfg.train.batch_size, engine))
    summary = {"steps": last_step, **counts, "train_loss": metrics.get("loss"),
               **{k: v for k, v in metrics.items() if k.startswith("eval_")}}
    model.eval()
    engine.save_final(model, tok, run.final, extra={"kind": "sft", "base": cfg.model.name,
                                                    "lora": cfg.model.lora.enabled,
                                                    "config_hash": config_hash(cfg), **summary})
    engine.finish(run, summary)
    return run.final


def check_config(cfg: Config) -> None:
    """Settings alignkit sft would not read."""
    reject_unused(cfg, {"data.max_prompt_length": "by alignkit sft: data.max_length bounds prompt + completion"})
    check_held_out(cfg.data, cfg.train)


def main(cfg: Config, resume: bool = False) -> Path:
    check_config(cfg)
    examples, eval_examples = load_demonstrations(cfg.data, cfg.run.seed)
    run = RunDir(cfg.run.output_dir, cfg.run.name, STAGE)
    engine = Engine(cfg.train.mixed_precision, seed=cfg.run.seed)
    final = train_sft(cfg, examples, run, eval_examples=eval_examples, resume=resume, engine=engine)
    if engine.is_main:
        done = json.loads((run.path / "DONE").read_text())
        skipped = done.get("skipped_examples")
        print(f"alignkit sft: {done.get('examples', len(examples))} examples"
              + (f" ({skipped} over data.max_length skipped)" if skipped else "") + f" -> {final}")
    return final
