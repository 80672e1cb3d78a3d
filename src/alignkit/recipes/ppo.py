"""PPO: fine-tune a policy against a reward, with a KL penalty to a frozen reference.

    alignkit ppo --config configs/ppo-tiny.yaml                 # seconds, tiny random model
    alignkit ppo --config configs/ppo.yaml                      # SmolLM2-135M + LoRA, offensive-language reward
    alignkit ppo --config configs/ppo.yaml reward.spec=rm:runs/demo/rm/final ppo.steps=200
    alignkit ppo --config configs/ppo.yaml --resume

One iteration, as in InstructGPT (Ouyang et al. 2022) and "The N+ Implementation
Details of RLHF with PPO" (Huang et al. 2024):

1. rollout: sample responses (alignkit.rollout.ppo_rollout) and record per-token
   log-probs, reference log-probs and values, all at the sampling temperature;
2. score: the reward (reward.spec) gives one score per response; a response
   without EOS gets ``reward.no_eos_penalty`` instead (when set);
3. KL-shaped rewards: ``-beta * (logprobs - ref_logprobs)`` per token, plus the
   score at the last token; beta fixed or adaptive (Ziegler et al. 2019);
4. GAE over valid tokens, advantages whitened over valid tokens;
5. update: ``ppo.ppo_epochs`` passes over shuffled minibatches, gradient
   accumulation, clipping; loss = policy + vf_coef * value - ent_coef * entropy.

Under ``accelerate launch`` / ``torchrun`` each process samples and scores its
share of the prompts (``ppo.rollout_batch_size`` and ``ppo.minibatch_size`` are
per process) and every process then holds the whole rollout: the KL controller,
the advantage whitening and the token counts that normalise the losses are the
global ones, so N processes x batch b make the update 1 process x batch N*b makes.

The critic is a value head on the policy's own trunk (``value.mode: shared``: one
forward gives logits and values) or a separate model (``value.mode: separate``)
initialised from a reward model (``value.init: runs/NAME/rm/final``). The reference
is the policy with its LoRA adapter off, or a frozen copy under full fine-tuning.

Run folder ``runs/NAME/ppo/``: config.yaml, metrics.jsonl + tb/ (``score/mean``,
``score/std``, ``kl``, ``kl_coef``, ``entropy``, ``clip_fraction``, ``approx_kl``,
``policy_loss``, ``value_loss``, ``explained_variance``, ``response_length``,
``no_eos_share``, ``tokens_per_s``, ``time/rollout``, ``time/score``,
``time/update``...), curves.png (score and KL), samples.jsonl (the last
rollout's responses), checkpoints/, final/ (the policy, save_model), DONE.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignkit.actor_critic import ActorCritic, reference_forward
from alignkit.advantages import (AdaptiveKLController, FixedKLController, explained_variance, gae, kl_shaped_rewards,
                                 masked_mean, masked_whiten)
from alignkit.config import (DataConfig, GenerationConfig, LoraConfig, ModelConfig, RunConfig, TrainConfig, check_warmup,
                             opt, reject_unused)
from alignkit.errors import AlignkitError, ConfigError
from alignkit.losses import entropy_bonus, entropy_from_logits, ppo_policy_loss, ppo_value_loss
from alignkit.models import is_peft, load_causal_lm, load_sequence_scorer, load_tokenizer, model_context
from alignkit.rewards import build_reward
from alignkit.online import (finish_run, kind_scores, load_prompt_set, mean_metrics, memory_metrics, online_unused,
                             prompt_batch, rollout_samples, run_steps, score_rollout)
from alignkit.rollout import Rollout, forward_responses, ppo_rollout, sampler_mismatch
from alignkit.runs import RunDir
from alignkit import training
from alignkit.training import Engine, build_scheduler, forward_rows, length_pieces

STAGE = "ppo"


# --------------------------------------------------------------------------- config


@dataclass
class RewardSection:
    spec: str | dict[str, Any] = opt("profanity", help="a reward spec: profanity, rule:..., rm:PATH, "
                                                       "classifier:MODEL:LABEL, python:mod:fn, or a mapping")
    no_eos_penalty: float | None = opt(None, help="score given to responses that never emitted EOS; "
                                                  "null keeps their reward")


@dataclass
class ValueSection:
    mode: str = opt("shared", choices=("shared", "separate"),
                    help="shared: a value head on the policy's trunk; separate: its own model")
    init: str = opt("policy", help="separate mode: a reward model (an alignkit rm run folder or its final/) "
                                   "or 'policy'")
    lora: LoraConfig = field(default_factory=LoraConfig)
    learning_rate: float | None = opt(None, gt=0, help="critic learning rate; null = train.learning_rate")


@dataclass
class DataSection:
    prompts: DataConfig = field(default_factory=lambda: DataConfig(
        path="builtin:prompts", format="prompts", kind="red_team", max_prompt_length=128))


@dataclass
class KLSection:
    coef: float = opt(0.05, ge=0, help="beta, the starting coefficient when adaptive")
    adaptive: bool = False
    target: float = opt(6.0, gt=0, help="adaptive: KL per sequence (nats) to hold")
    horizon: float = opt(10000, gt=0, help="adaptive: samples over which the gap closes")


@dataclass
class PPOSection:
    steps: int = opt(100, ge=1, help="iterations (rollout + update)")
    rollout_batch_size: int = opt(16, ge=1, help="prompts per iteration")
    samples_per_prompt: int = opt(1, ge=1)
    minibatch_size: int = opt(8, ge=1, help="sequences per optimizer step (split in train.grad_accum)")
    forward_rows: int = opt(0, ge=0, help="most sequences per forward + backward of the update and per rollout "
                                          "forward, per process, like lengths together (0: 4 on a CPU with LoRA, "
                                          "else the whole micro-batch)")
    ppo_epochs: int = opt(4, ge=1)
    clip_eps: float = opt(0.2, gt=0, lt=1, help="ratio clip; 1 or more would not clip below (the ratio is > 0)")
    value_clip_eps: float | None = opt(0.2, gt=0, help="null: no value clipping")
    vf_coef: float = opt(0.1, ge=0, help="c1")
    ent_coef: float = opt(0.0, ge=0, help="c2")
    gamma: float = opt(1.0, ge=0, le=1)
    lam: float = opt(0.95, ge=0, le=1)
    kl: KLSection = field(default_factory=KLSection)
    whiten_advantages: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(lora=LoraConfig(enabled=True)))
    reward: RewardSection = field(default_factory=RewardSection)
    value: ValueSection = field(default_factory=ValueSection)
    data: DataSection = field(default_factory=DataSection)
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=48))
    ppo: PPOSection = field(default_factory=PPOSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=1e-5, save_every=10))
    run: RunConfig = field(default_factory=RunConfig)


def check_config(cfg: Config) -> None:
    """Cross-field rules the per-field ranges cannot express."""
    n = cfg.ppo.rollout_batch_size * cfg.ppo.samples_per_prompt
    if n % cfg.ppo.minibatch_size:
        raise ConfigError(f"ppo.minibatch_size={cfg.ppo.minibatch_size} must divide the rollout of "
                          f"{n} sequences (rollout_batch_size x samples_per_prompt)")
    if cfg.ppo.minibatch_size % cfg.train.grad_accum:
        raise ConfigError(f"train.grad_accum={cfg.train.grad_accum} must divide "
                          f"ppo.minibatch_size={cfg.ppo.minibatch_size}")
    gen = cfg.generation
    if not gen.do_sample or gen.top_p < 1 or gen.top_k:
        # The log-probs are those of the full softmax at the temperature; a
        # truncated or greedy sampler draws from another distribution and the
        # importance ratios would be wrong.
        raise ConfigError("PPO samples from the full softmax: keep generation.do_sample=true, top_p=1.0, top_k=0 "
                          "(use generation.temperature to sharpen)")
    if cfg.value.mode == "shared" and (cfg.value.init != "policy" or cfg.value.lora.enabled):
        raise ConfigError("value.init and value.lora apply to a separate critic: set value.mode=separate")
    if cfg.train.max_steps is not None:
        raise ConfigError("train.max_steps is not used by PPO; set ppo.steps")
    reject_unused(cfg, {**online_unused("data.prompts", "by PPO"),
                        "train.epochs": "by PPO: set ppo.ppo_epochs (passes over each rollout) or ppo.steps",
                        "train.batch_size": "by PPO: set ppo.rollout_batch_size and ppo.minibatch_size"})
    if not cfg.ppo.kl.adaptive:
        reject_unused(cfg, {f"ppo.kl.{k}": "by a fixed KL coefficient: set ppo.kl.adaptive=true"
                            for k in ("target", "horizon")})
    p = cfg.ppo
    check_warmup(cfg.train, p.steps * p.ppo_epochs * n // p.minibatch_size,
                 "ppo.steps x ppo.ppo_epochs x minibatches per rollout")


# --------------------------------------------------------------------------- models


def load_value_model(cfg: Config, tok):
    name = cfg.model.name if cfg.value.init == "policy" else cfg.value.init
    if (Path(name) / "final" / "config.json").exists():  # a run folder, as rm:PATH accepts
        name = str(Path(name) / "final")
    vcfg = ModelConfig(name=name, dtype=cfg.model.dtype, lora=cfg.value.lora, cache_dir=cfg.model.cache_dir,
                       trust_remote_code=cfg.model.trust_remote_code, seed=cfg.model.seed)
    scorer = load_sequence_scorer(vcfg, trainable=True, rl=True, tokenizer=tok)
    base = scorer.get_base_model() if is_peft(scorer) else scorer
    if not isinstance(getattr(base, "score", None), nn.Module) or base.config.is_encoder_decoder:
        raise AlignkitError(f"value.init={cfg.value.init}: a separate critic needs a decoder reward model with a "
                            f"'score' head (a causal LM backbone), not {type(base).__name__}")
    return scorer


# --------------------------------------------------------------------------- phases


def ppo_update(ac: ActorCritic, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor, optimizer,
               scheduler, cfg: Config, generator: torch.Generator, engine: Engine,
               step: int = 0) -> list[dict[str, float]]:
    """PPO epochs over shuffled minibatches; returns one metrics dict per micro-batch of this process, in order.

    The rollout, advantages and returns are the whole rollout of all processes;
    the permutation and the minibatches are the same on every process, and each
    takes its share of each micro-batch. Each micro-batch's losses are sums over
    its tokens divided by the whole minibatch's token count (``num_tokens``, all
    processes), so accumulated gradients equal the whole minibatch's, whatever the
    accumulation and process count. Raises NonFiniteError before any step that
    would apply a non-finite loss or gradient.
    """
    p = cfg.ppo
    device = next(ac.parameters()).device
    pieces = forward_rows(p.forward_rows, p.minibatch_size // cfg.train.grad_accum, device, ac)
    lengths = rollout.attention_mask.sum(-1).tolist()
    minibatch = p.minibatch_size * engine.num_processes
    records = []
    ac.train()
    for epoch in range(p.ppo_epochs):
        order = torch.randperm(len(rollout), generator=generator).tolist()
        for mb_start in range(0, len(rollout), minibatch):
            mb = order[mb_start:mb_start + minibatch]
            num_tokens = rollout.mask[mb].sum().item()
            micro = length_pieces(mb, lengths, pieces, engine.num_processes)
            for share in engine.micro_batches(ac, micro):
                rows = torch.tensor(share.items)
                mb_mask = rollout.mask[rows].to(device)
                logprobs, values, logits = forward_responses(
                    ac, rollout.query_responses[rows].to(device), rollout.attention_mask[rows].to(device),
                    rollout.position_ids[rows].to(device), rollout.responses[rows].to(device), rollout.temperature)
                pg_loss, pg_metrics = ppo_policy_loss(logprobs, rollout.logprobs[rows].to(device),
                                                      advantages[rows].to(device), mb_mask, p.clip_eps, num_tokens)
                vf_loss, vf_metrics = ppo_value_loss(values, rollout.values[rows].to(device),
                                                     returns[rows].to(device), mb_mask, p.value_clip_eps, num_tokens)
                # Entropy through the graph only when it is part of the loss (it is a
                # (B, R, V) computation); otherwise it is measured, not trained.
                with torch.enable_grad() if p.ent_coef > 0 else torch.no_grad():
                    entropy = entropy_from_logits(logits, rollout.temperature)  # the batch's response columns
                    ent_bonus, ent_metrics = entropy_bonus(entropy, mb_mask[:, :entropy.shape[1]], num_tokens)
                loss = pg_loss + p.vf_coef * vf_loss - p.ent_coef * ent_bonus
                engine.backward(loss * share.weight)
                if share.weight:
                    records.append({**pg_metrics, **vf_metrics, **ent_metrics, "tokens": float(mb_mask.sum())})
            _, grad_norm = engine.step(ac, optimizer, scheduler, cfg.train, step)
            if records:
                records[-1]["grad_norm"] = grad_norm
    return records


# --------------------------------------------------------------------------- the recipe


@dataclass
class Setup:
    """Everything the loop uses, built once (see :func:`build`)."""

    tok: Any
    ac: nn.Module  # the ActorCritic, prepared by the engine
    reference: Any  # reference_forward(...)
    reward_fn: Any
    prompts: list
    prompt_ids: list[list[int]]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    kl_ctl: Any


def build(cfg: Config, engine: Engine) -> Setup:
    """Tokenizer, actor-critic, reference, reward, prompts, optimizer: everything before the loop,
    every model on the engine's device."""
    tok = load_tokenizer(cfg.model.name, cfg.model.cache_dir, padding_side="left")
    # rl=True: dropout off everywhere, so ratio == 1 and KL == 0 on the first minibatch.
    policy = load_causal_lm(cfg.model, trainable=True, rl=True, tokenizer=tok)
    value_model = load_value_model(cfg, tok) if cfg.value.mode == "separate" else None
    ac = engine.place(ActorCritic(policy, value_model))
    # before prepare: a full fine-tuning reference is a frozen copy of the placed, unwrapped policy
    reference = reference_forward(ac.policy, engine.autocast)
    reward_fn = build_reward(cfg.reward.spec, device=engine.device)
    prompts, prompt_ids = load_prompt_set(cfg.data.prompts, tok, model_context(policy), cfg.generation.max_new_tokens)
    optimizer = build_optimizer(ac, cfg)
    ac, optimizer, scheduler = engine.prepare(ac, optimizer, build_scheduler(optimizer, cfg.train), cfg.train)
    return Setup(tok, ac, reference, reward_fn, prompts, prompt_ids, optimizer, scheduler, kl_controller(cfg))


def build_optimizer(ac: ActorCritic, cfg: Config) -> torch.optim.Optimizer:
    critic_ids = {id(q) for q in ac.critic.parameters()}
    actor = [q for q in ac.parameters() if q.requires_grad and id(q) not in critic_ids]
    groups = [{"params": actor}, {"params": [q for q in ac.critic.parameters() if q.requires_grad],
                                  "lr": cfg.value.learning_rate or cfg.train.learning_rate}]
    return training.build_optimizer([g for g in groups if g["params"]], cfg.train)


def kl_controller(cfg: Config):
    k = cfg.ppo.kl
    return AdaptiveKLController(k.coef, k.target, k.horizon) if k.adaptive else FixedKLController(k.coef)


def main(cfg: Config, resume: bool = False) -> dict:
    check_config(cfg)
    engine = Engine(cfg.train.mixed_precision, seed=cfg.run.seed)
    run = RunDir(cfg.run.output_dir, cfg.run.name, STAGE)
    setup = build(cfg, engine)
    start = engine.start(run, cfg, cfg.ppo.steps, resume, setup.ac)
    if start.done:
        return json.loads((run.path / "DONE").read_text() or "{}")
    if start.step:
        setup.kl_ctl.load_state_dict(checkpoint_kl_state(start))
    p = cfg.ppo
    engine.print(f"ppo: {len(setup.prompts)} prompts, {p.rollout_batch_size} x {p.samples_per_prompt} samples per "
                 f"step x {engine.num_processes} process(es), {p.steps} steps, value {cfg.value.mode}, "
                 f"reward {setup.reward_fn.name}")

    last = run_steps(engine, run, start.step + 1, p.steps, lambda step: ppo_step(step, cfg, setup, engine),
                     cfg.train, "ppo", checkpoint_extra=lambda: {"kl_controller": setup.kl_ctl.state_dict()})
    policy = engine.unwrap(setup.ac).policy
    engine.save_final(policy, setup.tok, run.final, extra={"stage": STAGE, "base": cfg.model.name,
                                                           "reward": str(cfg.reward.spec), "steps": p.steps})
    summary = finish_run(engine, run, p.steps, last)
    engine.print(f"ppo: done; policy in {run.final}")
    return summary


def checkpoint_kl_state(start) -> dict:
    """The KL controller's state saved beside a checkpoint; resuming without it would restart an adaptive
    coefficient from ppo.kl.coef, which is not the same run."""
    state = (start.extra or {}).get("kl_controller")
    value = state.get("value") if isinstance(state, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise AlignkitError(f"{start.checkpoint / 'meta.json'}: field 'extra.kl_controller.value' must be a finite "
                            f"number >= 0 (the KL coefficient to resume with), got {value!r}; start without --resume, "
                            f"or remove this checkpoint to resume from the one before")
    return {"value": float(value)}


def ppo_step(step: int, cfg: Config, setup: Setup, engine: Engine) -> tuple[dict, list[dict]]:
    """One PPO iteration: rollout, score, KL-shaped rewards, GAE, update.

    Returns its metrics and the update's per-micro-batch records (this process's).
    """
    p = cfg.ppo
    n_procs = engine.num_processes
    idx = prompt_batch(len(setup.prompts), p.rollout_batch_size * n_procs, cfg.run.seed, step)
    batch_prompts = [setup.prompts[i].prompt for i in idx]
    batch_kinds = [setup.prompts[i].kind for i in idx]
    rows = forward_rows(p.forward_rows, p.minibatch_size // cfg.train.grad_accum, engine.device, setup.ac)

    # 1. rollout (no grad): each process samples and scores its share; all get the whole rollout
    t0 = time.perf_counter()
    rollout = ppo_rollout(setup.ac, setup.tok, [setup.prompt_ids[i] for i in idx], cfg.generation,
                          reference=setup.reference, n=p.samples_per_prompt, forward_batch_size=rows,
                          seed=cfg.run.seed * 1_000_003 + step, engine=engine)
    t1 = time.perf_counter()

    # 2. score
    scores, raw_scores = score_rollout(setup.reward_fn, batch_prompts, rollout, cfg.reward.no_eos_penalty, engine,
                                       kinds=batch_kinds)
    t2 = time.perf_counter()

    # 3. KL-shaped rewards: -beta * (logprobs - ref_logprobs) per token, + score at the last token
    mask = rollout.mask
    rewards, kl = kl_shaped_rewards(scores, rollout.logprobs, rollout.ref_logprobs, mask, setup.kl_ctl.value)
    seq_kl = kl.sum(-1)  # per sequence, in nats: what the adaptive controller tracks

    # 4. GAE; the value after the last token is 0 (the episode is over). Every process
    #    holds the whole rollout, so the whitening statistics are the global ones.
    advantages, returns = gae(rollout.values, rewards, mask, p.gamma, p.lam)
    if p.whiten_advantages:
        advantages = masked_whiten(advantages, mask)

    # 5. update
    generator = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step)
    lr = setup.scheduler.get_last_lr()[0]
    records = ppo_update(setup.ac, rollout, advantages, returns, setup.optimizer, setup.scheduler, cfg, generator,
                         engine, step)
    t3 = time.perf_counter()

    kl_coef = setup.kl_ctl.value
    setup.kl_ctl.update(seq_kl.mean().item(), len(rollout))
    ev = explained_variance(rollout.values, returns, mask)
    n_tokens = int(mask.sum())
    metrics = {
        "score/mean": scores.mean().item(),
        "score/std": scores.std().item() if len(scores) > 1 else 0.0,
        "score/raw_mean": raw_scores.mean().item(),
        **kind_scores(batch_kinds, rollout, scores),
        "kl": seq_kl.mean().item(),
        "kl_coef": kl_coef,
        "non_score_reward": (-kl_coef * seq_kl).mean().item(),
        **mean_metrics(records, engine),
        "explained_variance": None if ev != ev else ev,  # NaN (no return variance) logs as null
        "response_length": rollout.lengths.float().mean().item(),
        "no_eos_share": 1.0 - rollout.finished.float().mean().item(),
        "value_mean": masked_mean(rollout.values, mask).item(),
        "tokens_per_s": n_tokens / max(t1 - t0, 1e-9),
        **sampler_mismatch(rollout),
        **memory_metrics(),
        "lr": lr,
        "time/rollout": t1 - t0,
        "time/score": t2 - t1,
        "time/update": t3 - t2,
        "time/step": t3 - t0,
        "_samples": rollout_samples(batch_prompts, batch_kinds, rollout, scores),
    }
    return metrics, records
