"""The small pieces every training loop shares: optimizer, schedule, batches, checkpoints.

Recipes keep their loops in plain sight (see recipes/); this module only holds
what would otherwise be written four times. Data order is a pure function of
(seed, epoch), so a resumed run can skip to its position and see the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from alignkit.config import TrainConfig
from alignkit.runs import RunDir, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(params, train: TrainConfig) -> torch.optim.Optimizer:
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters")
    return torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then constant."""
    warm = train.warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)


def steps_per_epoch(n_examples: int, train: TrainConfig) -> int:
    return max(1, math.ceil(n_examples / (train.batch_size * train.grad_accum)))


def total_steps(n_examples: int, train: TrainConfig) -> int:
    if train.max_steps:
        return train.max_steps
    return max(1, math.ceil(steps_per_epoch(n_examples, train) * train.epochs))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def step_batches(n: int, train: TrainConfig, seed: int, start_step: int = 0):
    """Yield ``(step, [micro-batch index lists])`` for each optimizer step from ``start_step``.

    Each optimizer step takes ``grad_accum`` micro-batches of ``batch_size``; epochs
    are reshuffled deterministically; a partial last step of an epoch is kept.
    """
    per_step = train.batch_size * train.grad_accum
    spe = steps_per_epoch(n, train)
    last = total_steps(n, train)
    for step in range(start_step, last):
        epoch, k = divmod(step, spe)
        order = epoch_order(n, seed, epoch)
        chunk = order[k * per_step:(k + 1) * per_step]
        micro = [chunk[i:i + train.batch_size] for i in range(0, len(chunk), train.batch_size)]
        yield step + 1, micro


def clip_and_step(params, optimizer, scheduler, max_grad_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


@dataclass
class Resumed:
    step: int = 0
    extra: dict | None = None


def save_training_state(run: RunDir, step: int, model, optimizer, scheduler, train: TrainConfig,
                        extra: dict | None = None) -> None:
    """Trainable weights, optimizer, scheduler, RNG states and recipe extras, atomically."""
    weights = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    state = {"step": step, "weights": weights, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": rng_state(), "extra": extra or {}}
    save_checkpoint(run, step, state, keep=train.keep_checkpoints)


def restore_training_state(run: RunDir, model, optimizer, scheduler) -> Resumed:
    """Load the latest checkpoint into model/optimizer/scheduler; step 0 when none."""
    path = latest_checkpoint(run)
    if path is None:
        return Resumed()
    state = load_checkpoint(path)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state["weights"].items():
            params[k].copy_(v)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return Resumed(state["step"], state["extra"])
