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
examples with :func:`train_sft`.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

import torch

from alignkit.config import DataConfig, ModelConfig, RunConfig, TrainConfig, opt
from alignkit.data.collate import Encoded, collate, encode_example, shift_for_lm
from alignkit.data.formats import SFTExample, load_sft, parse_sft
from alignkit.data.io import ErrorPolicy, Record
from alignkit.errors import AlignkitError, ConfigError, DataError
from alignkit.losses import sft_loss
from alignkit.models import load_causal_lm, load_tokenizer, save_model
from alignkit.runs import MetricsLogger, RunDir, config_hash, progress, set_seed
from alignkit.training import (Resumed, build_optimizer, build_scheduler, clip_and_step, restore_training_state,
                               save_training_state, step_batches, steps_per_epoch, total_steps,
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


def synthetic_records(spec: str, as_sft: bool = False) -> list[Record]:
    """Records generated in code: ``synthetic:polite_vs_rude`` or ``synthetic:rankings``.

    Options go in a query string (``?n=2000&seed=0``, ``&k=4`` for rankings). With
    ``as_sft`` a pair becomes the demonstration ``{prompt, completion: chosen}``.
    """
    from alignkit.data import synthetic

    name, _, query = spec.removeprefix("synthetic:").partition("?")
    options = dict(parse_qsl(query))
    try:
        n, seed, k = int(options.pop("n", 2000)), int(options.pop("seed", 0)), int(options.pop("k", 4))
    except ValueError:
        raise AlignkitError(f"{spec}: n, seed and k must be whole numbers") from None
    if options:
        raise AlignkitError(f"{spec}: unknown option(s) {', '.join(options)}; known: n, seed, k")
    if name == "polite_vs_rude":
        rows = synthetic.polite_vs_rude_pairs(n, seed)
        if as_sft:
            rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    elif name == "rankings" and not as_sft:
        rows = synthetic.ranking_records(n, k, seed)
    else:
        known = "synthetic:polite_vs_rude" + ("" if as_sft else ", synthetic:rankings")
        raise AlignkitError(f"unknown synthetic data set '{spec}'; known: {known}")
    return [Record(f"synthetic:{name}", f"item {i}", row) for i, row in enumerate(rows)]


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


def _load_sft(path: str, data: DataConfig) -> list[SFTExample]:
    if path.startswith("synthetic:"):
        examples = [parse_sft(rec) for rec in synthetic_records(path, as_sft=True)]
        return examples[:data.limit] if data.limit else examples
    return load_sft(path, data.split, data.on_error, data.limit)


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


def make_batch(units: list, pad_id: int) -> tuple[dict, torch.Tensor]:
    """(model inputs, response mask) for a list of Encoded examples or PackedRows."""
    if isinstance(units[0], PackedRow):
        return collate_packed(units, pad_id)
    b = collate(units, pad_id)
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask}, b.response_mask


def response_nll(model, inputs: dict, response_mask: torch.Tensor, num_tokens: float | None = None):
    """``sft_loss`` of one batch: token t+1 is predicted at t; only response tokens count."""
    device = next(model.parameters()).device
    logits = model(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False).logits
    labels, mask = shift_for_lm(inputs["input_ids"].to(device), response_mask.to(device))
    return sft_loss(logits[:, :-1], labels, mask, num_tokens=num_tokens)


@torch.no_grad()
def evaluate(model, units: list, pad_id: int, batch_size: int) -> dict[str, float]:
    """Held-out loss (mean NLL per response token) and perplexity."""
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0.0
    for start in range(0, len(units), batch_size):
        inputs, mask = make_batch(units[start:start + batch_size], pad_id)
        # num_tokens=1 turns the token mean into the sum, so batches add up exactly.
        nll_sum, m = response_nll(model, inputs, mask, num_tokens=1)
        total_nll += float(nll_sum)
        total_tokens += m["tokens"]
    model.train(was_training)
    mean = total_nll / max(total_tokens, 1.0)
    return {"eval_loss": mean, "eval_perplexity": float(torch.tensor(mean).exp()), "eval_tokens": total_tokens}


# --------------------------------------------------------------------------- training


def run_dir_at(path: str | Path) -> RunDir:
    """A RunDir whose folder is exactly ``path`` (for recipes that nest SFT in their own run)."""
    p = Path(path)
    return RunDir(str(p.parent), p.name, "")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_sft(cfg: Config, examples: list[SFTExample], run_dir: RunDir | str | Path,
              eval_examples: list[SFTExample] | None = None, resume: bool = False,
              model=None, tokenizer=None) -> Path:
    """Fine-tune on ``examples``; returns the final model folder (``run_dir/final``).

    ``model``/``tokenizer`` default to ``cfg.model`` loaded fresh; pass them to
    fine-tune a model already in memory (it is trained in place).
    """
    run = run_dir if isinstance(run_dir, RunDir) else run_dir_at(run_dir)
    if not examples:
        raise AlignkitError("alignkit sft: no training examples")

    # -- setup: tokenizer, model, encoded data
    set_seed(cfg.run.seed)
    tok = tokenizer or load_tokenizer(cfg.model.name, cfg.model.cache_dir)
    if model is None:
        model = load_causal_lm(cfg.model, tokenizer=tok)
    model.to(_device())
    train_units: list = encode_all(tok, examples, cfg.data.max_length, cfg.data.on_error)
    eval_units: list = encode_all(tok, eval_examples or [], cfg.data.max_length, cfg.data.on_error)
    if not train_units:
        raise AlignkitError("alignkit sft: every training example was skipped")
    if cfg.packing:
        # Pack in a seeded random order so rows mix the data set; rows are then
        # shuffled per epoch like examples.
        order = list(range(len(train_units)))
        random.Random(cfg.run.seed).shuffle(order)
        train_units = pack([train_units[i] for i in order], cfg.data.max_length)
        eval_units = pack(eval_units, cfg.data.max_length)
    pad_id = tok.pad_token_id
    params = trainable_parameters(model)
    optimizer = build_optimizer(params, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    last_step = total_steps(len(train_units), cfg.train)

    if resume and run.is_done() and done_step(run) == last_step and run.final.exists():
        print(f"alignkit sft: {run.path} is already complete ({last_step} steps)")
        return run.final
    if not resume:
        clear_run(run)
    start = restore_training_state(run, model, optimizer, scheduler) if resume else Resumed()
    run.write_config(cfg)
    logger = MetricsLogger(run, resume_step=start.step if resume else None)
    eval_every = cfg.train.eval_every
    spe = steps_per_epoch(len(train_units), cfg.train)
    metrics: dict[str, float] = {}

    model.train()
    bar, task = progress(last_step, "sft")
    with bar:
        bar.update(task, completed=start.step)
        for step, micro in step_batches(len(train_units), cfg.train, cfg.run.seed, start.step):
            # 1. collate the micro-batches; the step's response-token count is the
            #    loss denominator, so 1 x 8 and 8 x 1 accumulation give one gradient
            batches = [make_batch([train_units[i] for i in idx], pad_id) for idx in micro]
            num_tokens = sum(float(mask[:, 1:].sum()) for _, mask in batches)

            # 2. forward + backward per micro-batch (sum of NLL / step tokens)
            step_loss = 0.0
            for inputs, mask in batches:
                loss, _ = response_nll(model, inputs, mask, num_tokens=num_tokens)
                loss.backward()
                step_loss += float(loss.detach())

            # 3. clip and update
            lr = scheduler.get_last_lr()[0]  # the rate this step used (step() moves it on)
            grad_norm = clip_and_step(params, optimizer, scheduler, cfg.train.max_grad_norm)

            # 4. log, evaluate, checkpoint
            metrics = {"loss": step_loss, "perplexity": float(torch.tensor(step_loss).exp()),
                       "tokens": num_tokens, "grad_norm": grad_norm, "lr": lr,
                       "epoch": step / spe}
            if eval_units and ((eval_every and step % eval_every == 0) or step == last_step):
                metrics.update(evaluate(model, eval_units, pad_id, cfg.train.batch_size))
            if step % cfg.train.log_every == 0 or step == last_step or "eval_loss" in metrics:
                logger.log(step, metrics)
            if cfg.train.save_every and step % cfg.train.save_every == 0:
                save_training_state(run, step, model, optimizer, scheduler, cfg.train)
            bar.update(task, advance=1, info=f"loss {step_loss:.3f}")

    # -- the final model (the last step logged the held-out loss)
    logger.close()
    if eval_units and "eval_loss" not in metrics:  # resumed at the very end: nothing ran
        metrics.update(evaluate(model, eval_units, pad_id, cfg.train.batch_size))
    summary = {"steps": last_step, "train_loss": metrics.get("loss"),
               **{k: v for k, v in metrics.items() if k.startswith("eval_")}}
    model.eval()
    save_model(model, tok, run.final, extra={"kind": "sft", "base": cfg.model.name, "lora": cfg.model.lora.enabled,
                                             "config_hash": config_hash(cfg), **summary})
    run.mark_done(summary)
    return run.final


def clear_run(run: RunDir) -> None:
    """A fresh start in a used folder: drop its checkpoints and DONE, so a later
    ``--resume`` cannot pick up a checkpoint of the earlier run."""
    shutil.rmtree(run.checkpoints, ignore_errors=True)
    (run.path / "DONE").unlink(missing_ok=True)


def done_step(run: RunDir) -> int | None:
    """The step count a finished run recorded in DONE (None when unfinished)."""
    try:
        return json.loads((run.path / "DONE").read_text()).get("steps")
    except (OSError, ValueError):
        return None


def main(cfg: Config, resume: bool = False) -> Path:
    examples, eval_examples = load_demonstrations(cfg.data, cfg.run.seed)
    run = RunDir(cfg.run.output_dir, cfg.run.name, STAGE)
    final = train_sft(cfg, examples, run, eval_examples=eval_examples, resume=resume)
    print(f"alignkit sft: {len(examples)} examples -> {final}")
    return final
