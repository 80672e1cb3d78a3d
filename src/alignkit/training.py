"""The training engine: the one place that knows about devices, precision and processes.

Every recipe that trains (sft, rm, dpo, ppo, and the fine-tuning inside best-of-n
and cai) keeps its loop in plain sight and asks the engine, a thin layer over
``accelerate.Accelerator``, for the rest::

    engine = Engine(cfg.train.mixed_precision, seed=cfg.run.seed)
    model = engine.place(model)                      # before anything samples or scores
    model, optimizer, scheduler = engine.prepare(model, build_optimizer(...), build_scheduler(...), cfg.train)
    start = engine.start(run, cfg, last_step, resume, model)       # done, fresh or resumed
    for step, micro in step_batches(n, cfg.train, seed, start.step, engine.num_processes):
        for share in engine.micro_batches(model, micro):   # no gradient sync until the last
            loss = ...                                      # normalised by the whole step's count
            engine.backward(loss * share.weight)
        lr, grad_norm = engine.step(model, optimizer, scheduler, cfg.train, step)
        engine.log(step, engine.reduce_sum(sums))
        engine.save_checkpoint(run, step)
    engine.save_final(model, tokenizer, run.final, meta)
    engine.finish(run, summary)

Processes. Launched by ``accelerate launch`` or ``torchrun``, one process per GPU
(or, on a machine without one, per CPU worker over gloo). ``train.batch_size`` is
per process, as in transformers' Trainer: a step sees ``num_processes x
batch_size x grad_accum`` examples. The data order is a pure function of (seed,
epoch), every process knows the whole step, and each takes its contiguous share of
each micro-batch (:meth:`Engine.micro_batches`): N processes x batch b see exactly
the examples of 1 process x batch N*b, and since every loss is normalised by the
count of the whole step (tokens, pairs, examples), the gradient is the same too.
Only the main process writes the run folder.

Precision. ``train.mixed_precision: bf16 | fp16`` runs forwards under autocast
with fp32 master weights and fp32 optimizer state; fp16 adds dynamic loss scaling
(a step whose gradients overflow is skipped, as the scaler intends). Trainable
weights must be fp32: ``model.dtype`` is for the frozen models (reference,
reward, judge, a LoRA base).

Checkpoints go through ``Accelerator.save_state`` (model, optimizer, scheduler,
and every RNG: Python, NumPy, torch CPU and CUDA, per process), written under a
temporary name and renamed, so a kill mid-write leaves the previous checkpoint as
the latest. Unsharded models keep only their trainable weights (a LoRA checkpoint
is the adapter, not the base model). The final model is gathered and unwrapped
(FSDP, DeepSpeed ZeRO-3) and saved loadable by plain transformers / peft.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit.config import TrainConfig
from alignkit.errors import AlignkitError, ConfigError, NonFiniteError
from alignkit.runs import MetricsLogger, RunDir, clear_run, done_step, progress, set_seed

CHECKPOINT_META = "meta.json"


# --------------------------------------------------------------------------- optimizer, schedule, data order


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(params, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over all tensors) where torch has it for the weights' device.

    torch's default on the CPU is a Python loop over the tensors: on MiniLM-L6 (22M weights)
    a quarter of a reward-model step. The fused kernel computes the same update (to float
    rounding).
    """
    params = list(params)  # tensors, or param groups ({"params": [...], "lr": ...})
    tensors = [t for g in params for t in (g["params"] if isinstance(g, dict) else [g])]
    if not tensors:
        raise ValueError("no trainable parameters")
    # fp16's loss scaler skips an overflowing step by its own check, which the fused kernel
    # bypasses (it takes the scale itself): the plain multi-tensor AdamW there
    fp16 = train.mixed_precision == "fp16" or (train.mixed_precision is None
                                               and os.environ.get("ACCELERATE_MIXED_PRECISION") == "fp16")
    fused = not fp16 and all(t.device.type in ("cpu", "cuda") and t.dtype in (torch.float32, torch.bfloat16)
                             for t in tensors)
    return torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay,
                             **({"fused": True} if fused else {"foreach": True}))


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then constant."""
    warm = train.warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)


def steps_per_epoch(n_examples: int, train: TrainConfig, num_processes: int = 1) -> int:
    return max(1, math.ceil(n_examples / (train.batch_size * train.grad_accum * num_processes)))


def total_steps(n_examples: int, train: TrainConfig, num_processes: int = 1) -> int:
    if train.max_steps:
        return train.max_steps
    return max(1, math.ceil(steps_per_epoch(n_examples, train, num_processes) * train.epochs))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def step_batches(n: int, train: TrainConfig, seed: int, start_step: int = 0, num_processes: int = 1):
    """Yield ``(step, [micro-batch index lists])`` for each optimizer step from ``start_step``.

    The lists are the *global* micro-batches (``batch_size x num_processes`` items;
    :meth:`Engine.micro_batches` hands each process its share). Each step takes
    ``grad_accum`` of them; epochs are reshuffled deterministically; a partial
    last step of an epoch is kept.
    """
    micro_size = train.batch_size * num_processes
    per_step = micro_size * train.grad_accum
    spe = steps_per_epoch(n, train, num_processes)
    last = total_steps(n, train, num_processes)
    for step in range(start_step, last):
        epoch, k = divmod(step, spe)
        order = epoch_order(n, seed, epoch)
        chunk = order[k * per_step:(k + 1) * per_step]
        micro = [chunk[i:i + micro_size] for i in range(0, len(chunk), micro_size)]
        yield step + 1, micro


def share_of(items: list, index: int, count: int) -> list:
    """Process ``index``'s contiguous share of ``items`` (sizes differ by at most one).

    >>> [share_of(list(range(5)), i, 2) for i in range(2)]
    [[0, 1, 2], [3, 4]]
    """
    base, extra = divmod(len(items), count)
    start = index * base + min(index, extra)
    return items[start:start + base + (index < extra)]


# Rows per forward + backward of an RL update on a CPU when the recipe's forward_rows is 0 (auto) and the
# trained weights are adapters. PPO with a SmolLM2 LoRA policy, minibatches of 8, 2 cores
# (benchmarks/ppo_vs_trl.py --recommended): the update took 16.2 s in whole minibatches, 13.5-14.6 s in
# pieces of 4, 19.5 s in pieces of 2, at a peak of 3.9, 2.8 and 2.2 GB. Small matmuls lose nothing on
# two cores, and one piece's activations are what the update holds. Trained in full, each piece's
# backward adds into a gradient as large as the weights: the same PPO with a separate value model
# (270M trained weights) took 34.0 s an update whole and 37.4 s in pieces of 4, for 0.3 GB less.
CPU_FORWARD_ROWS = 4
ADAPTER_SHARE = 0.1  # trained weights under this share of all: adapters (LoRA r=16 on SmolLM2: 3.6%)


def forward_rows(setting: int, micro_size: int, device: torch.device, model: torch.nn.Module) -> int:
    """Rows per process in each forward + backward of an update: ``setting``, or for 0 :data:`CPU_FORWARD_ROWS`
    on a CPU when ``model`` trains adapters only, else the whole micro-batch (an accelerator keeps busy on a
    wide batch; full gradients cost a pass over the weights' size per piece); never more than the micro-batch."""
    if not setting:
        counts = [(q.numel(), q.requires_grad) for q in model.parameters()]
        trained = sum(n for n, grad in counts if grad) / max(1, sum(n for n, _ in counts))
        setting = CPU_FORWARD_ROWS if device.type == "cpu" and trained < ADAPTER_SHARE else micro_size
    return max(1, min(setting, micro_size))


def length_pieces(items: list, lengths, rows: int, num_processes: int = 1, groups=None) -> list[list]:
    """A minibatch's global micro-batches: ``items`` shortest first by ``lengths[item]``, in pieces of
    ``rows`` per process; with ``groups``, ``items`` of one group (answers to one prompt) together
    first, in order of ``groups[item]``.

    Each piece's forward runs on the columns its rows use (see
    :func:`alignkit.rollout.forward_responses`), so rows of like length pad little, or
    runs each of its prompts once (:func:`alignkit.rollout.forward_shared_prompts`).
    The minibatch, and the gradient summed over it, are the same in any pieces.

    >>> length_pieces([4, 1, 3, 0], [9, 5, 7, 2, 8], 2)
    [[3, 1], [4, 0]]
    >>> length_pieces([4, 1, 3, 0], [9, 5, 7, 2, 8], 2, groups=[0, 1, 1, 1, 0])
    [[4, 0], [3, 1]]
    """
    order = sorted(items, key=lambda i: (groups[i] if groups is not None else 0, lengths[i], i))
    size = rows * num_processes
    return [order[k:k + size] for k in range(0, len(order), size)]


@dataclass(frozen=True)
class Share:
    """This process's part of a micro-batch.

    ``weight`` is 1.0, or 0.0 for a stand-in: when a short last micro-batch has
    fewer items than processes, a process without one runs the first item with
    its loss times 0, because every process must take part in each gradient sync.
    """

    items: list
    weight: float


@dataclass(frozen=True)
class Start:
    """Where a run begins: ``step`` steps already done (0 when fresh), what the
    recipe saved beside its checkpoint, and whether the run had already finished."""

    step: int = 0
    extra: dict | None = None
    done: bool = False
    checkpoint: Path | None = None  # the folder resumed from


class _NoLogger:
    """What processes other than the main one log to."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- the engine


def _accelerator_available() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return bool((xpu is not None and xpu.is_available()) or (mps is not None and mps.is_available()))


class Engine:
    """Devices, mixed precision and processes for one stage, over ``accelerate.Accelerator``."""

    def __init__(self, mixed_precision: str | None = None, seed: int = 0):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        # One Accelerator per stage; a pipeline runs several stages in one process,
        # each with its own precision. The process group (PartialState) is kept.
        AcceleratorState._reset_state()
        # Without a GPU, accelerate runs several processes only when told it is on
        # the CPU (gloo); otherwise each process would think it is alone.
        cpu = not _accelerator_available()
        # mixed_precision None: what the launch says (accelerate launch --mixed_precision, its config file)
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, step_scheduler_with_optimizer=False)
        self.mixed_precision = str(self.accelerator.mixed_precision)
        self._finite = True
        # wall time of the optimizer steps since the last log row (time/step)
        self._step_clock: float | None = None
        self._step_seconds: list[float] = []
        # Read once: a later stage's Engine resets accelerate's shared state, and an
        # engine that outlives it (best-of-n's, around each round's fine-tuning) must
        # still know where and who it is. Collectives below go through the process
        # group, which every Engine shares.
        self.device = self.accelerator.device
        self.num_processes = self.accelerator.num_processes
        self.process_index = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self.distributed_type = str(self.accelerator.distributed_type.value)
        self.sharded = self._sharded()
        if cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and self.num_processes > 1:
            # accelerate turns FSDP on for accelerator devices only; on CPU it would
            # silently fall back to DDP, which is not what the launch config asked for.
            raise ConfigError("FSDP needs GPUs (accelerate runs FSDP on accelerator devices only); "
                              "on CPU use configs/accelerate/ddp.yaml")
        if self.mixed_precision == "fp16" and self.device.type == "cpu":
            # accelerate leaves fp16 off on the CPU; torch has fp16 autocast and a
            # GradScaler there, so fp16 means the same thing on every device.
            self.accelerator.scaler = torch.amp.GradScaler("cpu")
            self.accelerator.native_amp = True
        set_seed(seed)

    # -- where and who

    def print(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs)

    def progress(self, total: int, description: str):
        return progress(total, description, disable=not self.is_main)

    def wait(self) -> None:
        if self.num_processes > 1:
            torch.distributed.barrier()

    # -- models

    def place(self, model):
        """Move a model (or anything with ``.to``) to this process's device; returns it."""
        return model.to(self.device)

    def prepare(self, model, optimizer, scheduler, train: TrainConfig):
        """Wrap a trainable model for the launch (DDP, FSDP, DeepSpeed), its optimizer and scheduler.

        Trainable weights must be fp32 (master weights for mixed precision); gradient
        checkpointing is switched on here when ``train.gradient_checkpointing``.
        """
        low = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                      if p.requires_grad and p.dtype != torch.float32})
        if low:
            raise ConfigError(f"trainable weights in {', '.join(low)}: training would update them without fp32 "
                              f"master weights; keep model.dtype=float32 and set train.mixed_precision=bf16 "
                              f"(with LoRA a bfloat16 base is fine: the adapter stays float32)")
        if self.mixed_precision == "fp16" and optimizer.defaults.get("fused"):
            raise ConfigError("fp16 loss scaling needs the unfused optimizer: build it with train.mixed_precision=fp16")
        if train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self.distributed_type == "DEEPSPEED" and plugin is not None:
            # DeepSpeed clips inside its step and wants a micro-batch size for its bookkeeping;
            # alignkit accumulates itself (the boundary comes from sync_gradients).
            plugin.deepspeed_config["gradient_clipping"] = train.max_grad_norm
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = train.batch_size
            plugin.deepspeed_config["gradient_accumulation_steps"] = 1
        return self.accelerator.prepare(model, optimizer, scheduler)

    def unwrap(self, model):
        """The model inside the launch wrapper (DDP, FSDP, DeepSpeed); sampling uses it."""
        return self.accelerator.unwrap_model(model)

    def autocast(self):
        """The forward precision of the prepared models, for forwards outside them (a reference)."""
        return self.accelerator.autocast()

    @contextlib.contextmanager
    def for_generation(self, model):
        """The unwrapped model with whole weights while it samples.

        DeepSpeed ZeRO-3 gathers the parameters for the duration, FSDP2 unshards the
        root's (the layers unshard themselves in their forwards); with either,
        sampling must run the same number of forwards on every process
        (:attr:`synced_generation`).
        """
        inner = self.unwrap(model)
        if not self.sharded:
            yield inner
        elif self.distributed_type == "DEEPSPEED":  # ZeRO-3
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                yield inner
        elif hasattr(model, "unshard"):  # FSDP2
            model.unshard()
            try:
                yield inner
            finally:
                model.reshard()
        else:  # FSDP1
            from torch.distributed.fsdp import FullyShardedDataParallel

            with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
                yield inner

    @property
    def synced_generation(self) -> bool:
        """Whether every process must keep stepping until all have finished (sharded weights)."""
        return self.num_processes > 1 and self.sharded

    # -- one optimizer step

    def micro_batches(self, model, micro: list[list]) -> Iterator[Share]:
        """This process's share of each global micro-batch; gradients sync on the last only."""
        acc = self.accelerator
        for k, batch in enumerate(micro):
            last = k == len(micro) - 1
            items = share_of(batch, self.process_index, self.num_processes)
            share = Share(items, 1.0) if items else Share(batch[:1], 0.0)
            # DeepSpeed reads the accumulation boundary from sync_gradients.
            acc.gradient_state._set_sync_gradients(last)
            try:
                with contextlib.nullcontext() if last else acc.no_sync(model):
                    yield share
            finally:
                acc.gradient_state._set_sync_gradients(True)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss normalised by the whole step's count (all processes).

        Data parallelism averages gradients over processes; the process count here
        turns that average back into the sum the normalisation expects.
        """
        self._finite = self._finite and bool(torch.isfinite(loss.detach()))
        self.accelerator.backward(loss * self.num_processes)

    def step(self, model, optimizer, scheduler, train: TrainConfig, step: int) -> tuple[float, float]:
        """Clip, check, update; returns ``(learning rate this step used, gradient norm)``.

        A non-finite loss on any process or a non-finite gradient norm stops the run
        (NonFiniteError naming the step) before the weights change. Under fp16 an
        overflowing gradient is the loss scaler's business: that step is skipped.
        """
        lr = scheduler.get_last_lr()[0]
        norm = self.accelerator.clip_grad_norm_(model.parameters(), train.max_grad_norm)
        norm = float(norm) if norm is not None else float("nan")
        finite_loss = self.all_true(self._finite)
        self._finite = True
        if not finite_loss:
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"step {step}: the loss is not finite")
        if not math.isfinite(norm) and self.mixed_precision != "fp16":
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"step {step}: the gradient norm is not finite")
        optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        if self._step_clock is not None:
            self._step_seconds.append(now - self._step_clock)
        self._step_clock = now
        return lr, norm

    @property
    def step_was_skipped(self) -> bool:
        return bool(self.accelerator.optimizer_step_was_skipped)

    # -- across processes

    def all_true(self, flag: bool) -> bool:
        if self.num_processes == 1:
            return bool(flag)
        t = torch.tensor([0.0 if flag else 1.0], device=self.device)
        torch.distributed.all_reduce(t)
        return float(t) == 0.0

    def reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over processes (one collective for the whole dict)."""
        if self.num_processes == 1 or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def reduce_max(self, value: float) -> float:
        if self.num_processes == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t)

    def gather(self, items: list) -> list:
        """Every process's list, concatenated in process order (any picklable items)."""
        if self.num_processes == 1:
            return list(items)
        out: list = [None] * self.num_processes
        torch.distributed.all_gather_object(out, list(items))
        return [x for part in out for x in part]

    def shard(self, items: list) -> list:
        """This process's contiguous share; :meth:`gather` of the shares is ``items`` again."""
        return share_of(items, self.process_index, self.num_processes)

    def eval_batches(self, items: list, batch_size: int) -> Iterator[tuple[list, float]]:
        """``(batch, weight)`` over this process's share, the same number of batches on every
        process (sharded weights gather in every forward): a process with fewer gets
        stand-ins of weight 0."""
        return eval_batches(self.shard(items), batch_size, math.ceil(math.ceil(len(items) / self.num_processes)
                                                                      / batch_size), items[:1])

    @contextlib.contextmanager
    def together(self):
        """Run a block on every process and fail on all of them if it fails on one.

        A user error on one process (a reward that raises, a bad record it alone
        reads) would otherwise leave the others waiting in their next collective.
        """
        error = None
        try:
            yield
        except AlignkitError as e:
            error = e
        if self.num_processes == 1:
            if error is not None:
                raise error
            return
        messages = self.gather([None if error is None else str(error)])
        first = next((m for m in messages if m), None)
        if first is not None:
            raise (error if error is not None else AlignkitError(first))

    # -- the run folder

    def start(self, run: RunDir, cfg: Any, last_step: int, resume: bool, model) -> Start:
        """The one rule for done / fresh / resumed runs.

        - ``--resume`` on a run whose DONE records ``last_step`` steps and whose
          final/ exists: done, nothing to run;
        - no ``--resume``: a fresh start; an old run's checkpoints and DONE in the
          folder are dropped, so a later ``--resume`` never continues another run;
        - ``--resume``: the latest checkpoint's model, optimizer, scheduler and RNG
          states are loaded (prepare them first), or step 0 when there is none.

        A ``--resume`` whose config differs from the run's ``config.yaml`` in anything but
        :data:`RESUMABLE_CHANGES` (its checkpoints would continue another run), or whose latest
        checkpoint is past ``last_step``, is an error.

        Writes the resolved config and opens the metrics log (main process only).
        """
        if resume and (run.is_done() or checkpoints(run)):
            check_resumable_config(run, cfg)  # every process: each raises the same error, none waits
        if resume and run.is_done() and done_step(run) == last_step and run.final.exists():
            self.print(f"alignkit: {run.path} is already complete ({last_step} steps)")
            return Start(last_step, None, done=True)
        if self.is_main:  # a kill while a checkpoint was being written leaves its temporary folder
            for tmp in run.checkpoints.glob(".tmp-*") if run.checkpoints.exists() else []:
                shutil.rmtree(tmp, ignore_errors=True)
        if not resume:
            if self.is_main:
                clear_run(run)
            self.wait()
            start = Start()
        else:
            start = self.load_checkpoint(run, model)
            if start.step > last_step:  # the loop would run no step and save the checkpoint's model as final
                raise ConfigError(f"--resume: the checkpoint of {run.path} to resume from is step {start.step}, past this "
                                  f"config's last step {last_step}: ask for at least {start.step} steps, or start "
                                  f"without --resume")
        if self.is_main:
            run.write_config(cfg)
        self._logger = self.open_log(run, resume_step=start.step if resume else None)
        return start

    def open_log(self, run: RunDir, resume_step: int | None = None):
        """The run's metrics log (main process); the other processes log nowhere."""
        return MetricsLogger(run, resume_step=resume_step) if self.is_main else _NoLogger()

    def log(self, step: int, metrics: dict) -> None:
        """One metrics row; the training loops' rows get ``time/step``, the mean wall seconds of
        the optimizer steps since the previous row (from the end of one step to the end of the
        next: batching, forwards, backwards and the update; the first step of a run, which
        has no previous end, is left out)."""
        if self._step_seconds and "time/step" not in metrics:
            metrics = {**metrics, "time/step": sum(self._step_seconds) / len(self._step_seconds)}
        self._step_seconds = []
        self._logger.log(step, metrics)

    def close_log(self) -> None:
        self._logger.close()

    def save_checkpoint(self, run: RunDir, step: int, train: TrainConfig, extra: dict | None = None) -> Path:
        """Everything to resume from after ``step``, as ``checkpoints/step-N`` (atomic)."""
        final = run.checkpoints / f"step-{step:06d}"
        tmp = run.checkpoints / f".tmp-step-{step:06d}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.wait()
        handle = self.accelerator.register_save_state_pre_hook(_trainable_weights_only)
        try:
            self.accelerator.save_state(str(tmp), safe_serialization=True)
        finally:
            handle.remove()
        self.wait()  # every process has written its part (its RNG state) before the folder is renamed
        if self.is_main:
            (tmp / CHECKPOINT_META).write_text(json.dumps({"step": step, "time": time.time(), "extra": extra or {}}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in sorted(run.checkpoints.glob("step-*"))[:-train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.wait()
        return final

    def load_checkpoint(self, run: RunDir, model) -> Start:
        """The newest checkpoint that loads, into the prepared model, optimizer, scheduler and RNGs.

        A checkpoint that cannot be read (cut short, emptied, from another model) is
        passed over for the one before it, with a message; none at all is step 0, none
        that loads an error listing why each failed.
        """
        found = checkpoints(run)
        failures = []
        for path in reversed(found):
            try:
                step, extra = self._checkpoint_meta(path)  # first: a bad meta.json loads no state at all
                # accelerate only logs an unreadable RNG state; resuming without it is not the same run
                torch.load(path / f"random_states_{self.process_index}.pkl", weights_only=False)
                # Optimizer, scheduler, RNG states (and sharded models) through accelerate; strict=False
                # because an unsharded model's file holds its trainable weights only, loaded just below.
                self.accelerator.load_state(str(path), strict=False)
                if not self.sharded:
                    _load_trainable(self.unwrap(model), path / "model.safetensors")
            except Exception as e:  # noqa: BLE001 - any way a file can be broken; the next one may load
                failures.append(f"{path.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            if failures:
                self.print(f"alignkit: could not load {'; '.join(failures)}; resuming from {path.name}")
            return Start(step, extra, checkpoint=path)
        if failures:
            raise AlignkitError(f"{run.checkpoints}: cannot read checkpoint ({'; '.join(failures)}); start "
                                f"without --resume to train from the beginning")
        return Start()

    @staticmethod
    def _checkpoint_meta(path: Path) -> tuple[int, dict]:
        """(step, extra) from a checkpoint's meta.json; ValueError naming the file when it is not what
        :meth:`Engine.save_checkpoint` writes (not JSON, no whole 'step' >= 0, 'extra' not a mapping)."""
        file = path / CHECKPOINT_META
        try:
            meta = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{CHECKPOINT_META}: cannot read it ({type(e).__name__})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{CHECKPOINT_META}: not JSON ({e})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{CHECKPOINT_META}: must be a JSON object, got {type(meta).__name__}")
        step = meta.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{CHECKPOINT_META}: field 'step' must be a whole number >= 0, got {step!r}"
                             if "step" in meta else f"{CHECKPOINT_META}: no field 'step'")
        extra = meta.get("extra") or {}
        if not isinstance(extra, dict):
            raise ValueError(f"{CHECKPOINT_META}: field 'extra' must be a mapping, got {type(extra).__name__}")
        return step, extra

    def save_final(self, model, tokenizer, out: Path, extra: dict | None = None) -> Path:
        """The trained model as a plain transformers / peft folder (gathered when sharded)."""
        from alignkit.models import save_model

        state = None
        if self.sharded:
            state = self.accelerator.get_state_dict(model)  # a collective: every process calls it
        if self.is_main:
            save_model(self.unwrap(model), tokenizer, out, extra=extra, state_dict=state)
        self.wait()
        return out

    def stopped(self, run: RunDir, step: int, error: AlignkitError) -> AlignkitError:
        """The one-line error a loop stops with: the step, the cause, the checkpoint to resume from."""
        cause = str(error)
        if cause.startswith(f"step {step}: "):
            cause = cause[len(f"step {step}: "):]
        ckpt = latest_checkpoint(run)
        return AlignkitError(f"step {step}: {cause}; stopped. Last good checkpoint: "
                             f"{ckpt if ckpt else 'none (no checkpoint written yet)'}")

    def finish(self, run: RunDir, summary: dict) -> None:
        """DONE, written last (a pipeline skips stages that have it)."""
        if self.is_main:
            run.mark_done(summary)
        self.wait()

    def _sharded(self) -> bool:
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if acc.distributed_type == DistributedType.FSDP:
            return True
        plugin = getattr(acc.state, "deepspeed_plugin", None)
        return acc.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3


# Keys a ``--resume`` may change: how long the run is, how often it logs, evaluates and saves, and
# how the work is carried out (not its arithmetic). Any other change (model, LoRA, data, batch size,
# learning rate, seed, precision, sampling) would continue the checkpoints of one run as another.
RESUMABLE_CHANGES = ("run.output_dir", "run.name", "train.max_steps", "train.epochs", "ppo.steps", "rl.steps",
                     "train.log_every", "train.eval_every", "train.save_every", "train.keep_checkpoints",
                     "train.gradient_checkpointing", "model.cache_dir", "model.attn_implementation",
                     "generation.batch_size", "generation.cache")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def check_resumable_config(run: RunDir, cfg: Any) -> None:
    """ConfigError naming the keys where ``cfg`` differs from the config the run in ``run`` was
    trained with (its ``config.yaml``), other than :data:`RESUMABLE_CHANGES`. A run folder without
    config.yaml (written by an older alignkit) is not checked."""
    import yaml

    from alignkit.config import to_dict

    file = run.path / "config.yaml"
    if not file.exists():
        return
    try:
        before = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise AlignkitError(f"{file}: cannot read the config the run was trained with ({type(e).__name__}), so "
                            f"--resume cannot check it is the same run; start without --resume") from None
    if not isinstance(before, dict):
        raise AlignkitError(f"{file}: not the config the run was trained with (a YAML mapping); "
                            f"start without --resume")
    old = _flat(before)
    new = _flat(yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False)))  # as config.yaml holds it
    changed = [k for k in sorted(old.keys() | new.keys())
               if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)]
    if changed:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise ConfigError(f"--resume: {run.path} was trained with another config ({shown}{more}; from {file}); "
                          f"its checkpoints would continue that run as this one. Set these back, or start "
                          f"without --resume (only step counts and how often to log, evaluate and save may "
                          f"change on a resume)")


def eval_batches(mine: list, batch_size: int, count: int, stand_in: list) -> Iterator[tuple[list, float]]:
    for k in range(count):
        batch = mine[k * batch_size:(k + 1) * batch_size]
        yield (batch, 1.0) if batch else (stand_in, 0.0)


class SingleProcess:
    """What sampling and evaluation code needs of an Engine, for one process with models where they are."""

    mixed_precision = "no"
    num_processes = 1
    process_index = 0
    is_main = True
    synced_generation = False

    def shard(self, items: list) -> list:
        return list(items)

    def gather(self, items: list) -> list:
        return list(items)

    def eval_batches(self, items: list, batch_size: int) -> Iterator[tuple[list, float]]:
        return eval_batches(items, batch_size, math.ceil(len(items) / batch_size), items[:1])

    def reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        return dict(values)

    def reduce_max(self, value: float) -> float:
        return float(value)

    def together(self):
        return contextlib.nullcontext()

    def print(self, *args, **kwargs) -> None:
        print(*args, **kwargs)

    def progress(self, total: int, description: str):
        return progress(total, description)

    def unwrap(self, model):
        return model

    def autocast(self):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def for_generation(self, model):
        yield model


def _trainable_weights_only(models, weights, output_dir) -> None:
    """accelerate's save hook: each unsharded model's trainable weights only, under the unwrapped
    model's names (no DDP ``module.`` prefix), so a checkpoint loads whatever the process count."""
    for i, model in enumerate(models[:len(weights)]):
        wrapped = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        names = {name.removeprefix("module.") if wrapped else name
                 for name, p in model.named_parameters() if p.requires_grad}
        clean = {(k.removeprefix("module.") if wrapped else k): v for k, v in weights[i].items()}
        weights[i] = {k: v for k, v in clean.items() if k in names}


def _load_trainable(model, path: Path) -> None:
    """The trainable weights of a checkpoint into the unwrapped ``model``; a mismatch is an error."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if state.keys() != params.keys():
        raise AlignkitError(f"{path}: holds {len(state)} trainable weights, the model has {len(params)} "
                            f"(not a checkpoint of this model and config)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def checkpoints(run: RunDir) -> list[Path]:
    """The run's complete checkpoints (their meta.json written last), oldest first."""
    if not run.checkpoints.exists():
        return []
    return sorted(p for p in run.checkpoints.glob("step-*") if (p / CHECKPOINT_META).exists())


def latest_checkpoint(run: RunDir) -> Path | None:
    found = checkpoints(run)
    return found[-1] if found else None


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass instead of storing them (every transformers model inside)."""
    from transformers import PreTrainedModel

    found = False
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            found = True
            # transformers 5.x renamed gradient checkpointing to activation checkpointing
            on = getattr(module, "is_activation_checkpointing", None)
            on = on if on is not None else module.is_gradient_checkpointing
            if not on:
                # Non-reentrant: works with frozen inputs (LoRA) and no_sync.
                kwargs = {"use_reentrant": False}
                if hasattr(module, "activation_checkpointing_enable"):
                    module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
                else:
                    module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not found:
        raise ConfigError("train.gradient_checkpointing: this model does not support gradient checkpointing")
