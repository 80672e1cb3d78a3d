"""Critic-free online RL: GRPO (and the DAPO / Dr. GRPO variants), RLOO, REINFORCE++ and online DPO.

    alignkit rl --config configs/rl-grpo-tiny.yaml                          # seconds, tiny random model
    alignkit rl --config configs/rl-grpo.yaml                               # SmolLM2-135M + LoRA
    alignkit rl --config configs/rl-grpo.yaml rl.algorithm=rloo
    alignkit rl --config configs/rl-grpo.yaml rl.algorithm=online_dpo rl.samples_per_prompt=2

No value model: the baseline comes from the other samples of the same prompt (GRPO,
RLOO), from the whole batch (REINFORCE++), or there is none because the update is a
preference loss on two fresh samples (online DPO). So these need less memory than
PPO and work with any reward alignkit has: reward models, classifiers, LLM judges,
rules and Python functions (verifiable rewards). One iteration:

1. rollout: ``rl.samples_per_prompt`` (G) answers per prompt from the current policy
   (:func:`alignkit.rollout.ppo_rollout`, no critic): log-probs and the reference's
   (the sampler's own log-probs when each rollout is trained with a single optimizer
   step, :func:`single_step`: the update's forward is then the old policy's);
2. score: the reward (``reward.spec``); a response without EOS gets
   ``reward.no_eos_penalty`` instead, when set;
3. advantages, by ``rl.algorithm`` (the math is in :mod:`alignkit.advantages`):

   - ``grpo`` (Shao et al. 2024): ``(r - mean_group) / (std_group + eps)`` per sample,
     ``rl.scale_rewards: false`` drops the std (Dr. GRPO); KL to the reference as a
     loss term (``rl.kl_coef`` x k3, ``rl.kl_in: loss``) or in the reward
     (``kl_in: reward``: ``r - beta * KL(sequence)``); ``rl.filter_uniform_groups``
     leaves out groups whose scores are all equal (DAPO's dynamic sampling), counted;
   - ``rloo`` (Ahmadian et al. 2024): ``r - beta * KL`` against the mean of the
     other G - 1 samples' (leave-one-out);
   - ``reinforce_pp`` (Hu 2025): KL-shaped per-token rewards as PPO's, returns
     without a critic (discounted reward-to-go), whitened over the whole batch;
   - ``online_dpo`` (Guo et al. 2024): G = 2; the reward (or ``rl.judge``, a
     pairwise judge) picks chosen and rejected, a tie is left out; the DPO (or IPO)
     loss against the reference on that fresh pair;

4. update: ``rl.epochs`` passes over shuffled minibatches; the clipped surrogate with
   ``rl.clip_eps_low`` / ``rl.clip_eps_high`` (DAPO's clip-higher), summed over tokens
   by ``rl.aggregation``: ``sequence`` (GRPO), ``token`` (DAPO) or ``constant``
   (Dr. GRPO); plus ``kl_coef`` x the KL loss for GRPO with ``kl_in: loss``.

Everything runs on the engine (:mod:`alignkit.training`): several processes (each
samples and scores its share of the prompts; ``rl.prompts_per_step`` and
``rl.minibatch_size`` are per process), mixed precision, resume. The run folder is
PPO's: config.yaml, metrics.jsonl + tb/ (``score/mean``, ``kl``, ``entropy``,
``clip_fraction``, ``response_length``, ``tokens_per_s``, ``filtered_groups``...),
curves.png, samples.jsonl, checkpoints/, final/, DONE.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from alignkit.actor_critic import ActorCritic, reference_forward
from alignkit.advantages import (gae, group_advantages, kl_shaped_rewards, leave_one_out_advantages, masked_mean,
                                 masked_whiten, uniform_groups)
from alignkit.config import (DataConfig, GenerationConfig, LoraConfig, ModelConfig, RunConfig, TrainConfig, check_warmup,
                             opt, reject_unused)
from alignkit.errors import AlignkitError, ConfigError
from alignkit.losses import (AGGREGATIONS, aggregation_weights, clipped_policy_loss, dpo_loss, entropy_from_logits,
                             ipo_loss, kl_loss, sequence_logprobs)
from alignkit.models import load_causal_lm, load_tokenizer, model_context
from alignkit.online import (finish_run, kind_scores, load_prompt_set, mean_metrics, memory_metrics, online_unused,
                             prompt_batch, rollout_samples, run_steps, score_rollout)
from alignkit.rewards import build_reward
from alignkit.rollout import (Rollout, forward_responses, forward_shared_prompts, ppo_rollout, sampler_mismatch,
                              shares_prompts)
from alignkit.runs import RunDir
from alignkit.training import (Engine, build_optimizer, build_scheduler, forward_rows, length_pieces,
                               trainable_parameters)

STAGE = "rl"
ALGORITHMS = ("grpo", "rloo", "reinforce_pp", "online_dpo")
NO_ADVANTAGE = 1e-6  # |advantage| at most this: float rounding of equal scores, nothing to learn


# --------------------------------------------------------------------------- config


@dataclass
class RewardSection:
    spec: str | dict[str, Any] = opt("profanity", help="a reward spec: profanity, rule:..., rm:PATH, "
                                                       "classifier:MODEL:LABEL, judge:..., python:mod:fn, a mapping")
    no_eos_penalty: float | None = opt(None, help="score given to responses that never emitted EOS")


@dataclass
class DataSection:
    prompts: DataConfig = field(default_factory=lambda: DataConfig(
        path="builtin:prompts", format="prompts", kind="red_team", max_prompt_length=128))


@dataclass
class RLSection:
    algorithm: str = opt("grpo", choices=ALGORITHMS)
    steps: int = opt(100, ge=1, help="iterations (rollout + update)")
    prompts_per_step: int = opt(8, ge=1, help="prompts per iteration, per process")
    samples_per_prompt: int = opt(4, ge=2, help="G: the group of answers to each prompt (online_dpo: 2)")
    minibatch_size: int = opt(16, ge=1, help="sequences per optimizer step, per process (split in train.grad_accum)")
    forward_rows: int = opt(0, ge=0, help="most sequences per forward + backward of the update and per rollout "
                                          "forward, per process, like lengths together (0: 4 on a CPU with LoRA, "
                                          "else the whole micro-batch)")
    epochs: int = opt(1, ge=1, help="passes over each rollout (GRPO's mu)")
    clip_eps_low: float = opt(0.2, gt=0, lt=1, help="ratio clip below 1")
    clip_eps_high: float = opt(0.2, gt=0, help="ratio clip above 1; > clip_eps_low is DAPO's clip-higher")
    aggregation: str = opt("sequence", choices=AGGREGATIONS,
                           help="sequence: GRPO, token: DAPO, constant: Dr. GRPO (divides by max_new_tokens)")
    scale_rewards: bool = opt(True, help="grpo: divide by the group's std (false: Dr. GRPO)")
    kl_coef: float = opt(0.04, ge=0, help="beta: weight of the KL to the reference (0: none)")
    kl_in: str = opt("loss", choices=("loss", "reward"),
                     help="grpo: KL as a loss term (k3) or in the reward; rloo and reinforce_pp: always reward")
    filter_uniform_groups: bool = opt(False, help="leave out groups whose scores are all equal (DAPO)")
    gamma: float = opt(1.0, ge=0, le=1, help="reinforce_pp: discount of the per-token returns")
    dpo_beta: float = opt(0.1, gt=0, help="online_dpo: the DPO / IPO beta")
    dpo_loss: str = opt("dpo", choices=("dpo", "ipo"))
    judge: str = opt("", help="online_dpo: a pairwise judge (python:mod:fn, judge:pairwise) that picks "
                              "chosen and rejected instead of the reward")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(lora=LoraConfig(enabled=True)))
    reward: RewardSection = field(default_factory=RewardSection)
    data: DataSection = field(default_factory=DataSection)
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=48))
    rl: RLSection = field(default_factory=RLSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=1e-5, save_every=10))
    run: RunConfig = field(default_factory=RunConfig)


def check_config(cfg: Config) -> None:
    """Cross-field rules the per-field ranges cannot express."""
    r = cfg.rl
    if r.algorithm == "online_dpo" and r.samples_per_prompt != 2:
        raise ConfigError(f"rl.algorithm=online_dpo compares two answers per prompt: set rl.samples_per_prompt=2 "
                          f"(got {r.samples_per_prompt})")
    if r.judge and r.algorithm != "online_dpo":
        raise ConfigError("rl.judge picks pairs for rl.algorithm=online_dpo; the other algorithms use reward.spec")
    if r.filter_uniform_groups and r.algorithm not in ("grpo", "rloo"):
        raise ConfigError(f"rl.filter_uniform_groups leaves out groups of equal scores for grpo and rloo; "
                          f"rl.algorithm={r.algorithm} has no groups to filter")
    rows = r.prompts_per_step * r.samples_per_prompt
    if r.minibatch_size % cfg.train.grad_accum:
        raise ConfigError(f"train.grad_accum={cfg.train.grad_accum} must divide rl.minibatch_size={r.minibatch_size}")
    if r.minibatch_size > rows:
        raise ConfigError(f"rl.minibatch_size={r.minibatch_size} is more than a step's {rows} sequences "
                          f"(prompts_per_step x samples_per_prompt)")
    gen = cfg.generation
    if not gen.do_sample or gen.top_p < 1 or gen.top_k:
        raise ConfigError("the RL optimisers sample from the full softmax: keep generation.do_sample=true, "
                          "top_p=1.0, top_k=0 (use generation.temperature to sharpen)")
    if cfg.train.max_steps is not None:
        raise ConfigError("train.max_steps is not used here; set rl.steps")
    reject_unused(cfg, {**online_unused("data.prompts", "by alignkit rl"),
                        "train.epochs": "by alignkit rl: set rl.epochs (passes over each rollout) or rl.steps",
                        "train.batch_size": "by alignkit rl: set rl.prompts_per_step and rl.minibatch_size"})
    # the knobs of one algorithm, silently ignored by the others
    owners = {"rl.gamma": ("reinforce_pp",), "rl.dpo_beta": ("online_dpo",), "rl.dpo_loss": ("online_dpo",),
              "rl.scale_rewards": ("grpo",), "rl.kl_in": ("grpo", "rloo", "reinforce_pp")}
    reject_unused(cfg, {key: f"by rl.algorithm={r.algorithm}: it is a setting of {' and '.join(algos)}"
                        for key, algos in owners.items() if r.algorithm not in algos})
    if r.algorithm == "online_dpo":  # pairs: at most one per prompt, in minibatches of minibatch_size / 2 pairs
        updates = math.ceil(r.prompts_per_step / max(1, r.minibatch_size // 2))
    else:
        updates = math.ceil(rows / r.minibatch_size)
    check_warmup(cfg.train, r.steps * r.epochs * updates, "rl.steps x rl.epochs x minibatches per rollout")


# --------------------------------------------------------------------------- advantages


def rollout_advantages(cfg: Config, rollout: Rollout, scores: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``(B, T)`` advantages for the policy-gradient algorithms, and what they measured.

    Sequence-level advantages (GRPO, RLOO) are the same on every token of a row.
    """
    r = cfg.rl
    mask, G = rollout.mask, r.samples_per_prompt
    kl = (rollout.logprobs - rollout.ref_logprobs) * mask  # k1 per token, the reward penalty's estimate
    seq_kl = kl.sum(-1)
    info = {}
    if r.algorithm == "grpo":
        rewarded = scores - r.kl_coef * seq_kl if r.kl_in == "reward" else scores
        seq_adv = group_advantages(rewarded, G, scale=r.scale_rewards)
    elif r.algorithm == "rloo":
        seq_adv = leave_one_out_advantages(scores - r.kl_coef * seq_kl, G)
    elif r.algorithm == "reinforce_pp":
        rewards, _ = kl_shaped_rewards(scores, rollout.logprobs, rollout.ref_logprobs, mask, r.kl_coef)
        _, returns = gae(torch.zeros_like(rewards), rewards, mask, r.gamma, 1.0)  # no critic: reward-to-go
        return masked_whiten(returns, mask), info
    else:
        raise ValueError(f"no token advantages for {r.algorithm}")
    return seq_adv[:, None].expand_as(mask).float() * mask, info


def pick_pairs(cfg: Config, rollout: Rollout, scores: torch.Tensor, judge, prompts: list,
               engine=None) -> tuple[list, int]:
    """Online DPO: ``[(chosen row, rejected row)]`` for each prompt's two answers, and how many tied.

    The reward decides, or ``rl.judge`` (asked in both orders by :mod:`alignkit.eval.metrics`'s
    pairwise judges); equal scores, a tie or identical texts give no pair. With several
    processes each judges its share of the pairs and all get every verdict, so that a judge
    that samples cannot leave the processes with different pairs (and none judges twice).
    """
    from alignkit.training import SingleProcess

    engine = engine or SingleProcess()
    n_prompts = len(rollout) // 2
    a_rows, b_rows = list(range(0, 2 * n_prompts, 2)), list(range(1, 2 * n_prompts, 2))
    if judge is not None:
        mine = engine.shard(list(range(n_prompts)))
        with engine.together():
            verdicts = judge.compare([prompts[int(rollout.prompt_index[a_rows[i]])] for i in mine],
                                     [rollout.texts[a_rows[i]] for i in mine], [rollout.texts[b_rows[i]] for i in mine])
        outcomes = engine.gather(list(verdicts))
    else:
        outcomes = ["win" if scores[a] > scores[b] else "loss" if scores[a] < scores[b] else "tie"
                    for a, b in zip(a_rows, b_rows)]
    pairs, ties = [], 0
    for a, b, outcome in zip(a_rows, b_rows, outcomes):
        if outcome == "tie" or rollout.texts[a] == rollout.texts[b]:
            ties += 1
        else:
            pairs.append((a, b) if outcome == "win" else (b, a))
    return pairs, ties


# --------------------------------------------------------------------------- updates


def _forward(model, rollout: Rollout, rows: torch.Tensor, device, share: bool = False):
    """The policy's log-probs of ``rows``; with ``share``, each prompt among them runs once."""
    batch = (t[rows].to(device) for t in (rollout.query_responses, rollout.attention_mask, rollout.position_ids,
                                          rollout.responses))
    return (forward_shared_prompts if share else forward_responses)(model, *batch, rollout.temperature)


def _shares_prompts(model, cfg: Config, engine: Engine) -> bool:
    """Whether the update runs each prompt of a piece once: several answers to a prompt, and a
    critic-free causal policy whose forward keeps a cache in training."""
    inner = engine.unwrap(model)
    return not inner.has_critic and shares_prompts(inner.policy, cfg.rl.samples_per_prompt)


def single_step(cfg: Config) -> bool:
    """Whether GRPO trains each rollout with one optimizer step on all of it.

    Then the policy the update starts from is the one that sampled, its old
    log-probs are its own forward's (detached: the ratio is exactly 1, as in
    GRPO with mu = 1), and the rollout's policy forward can be skipped; with a
    half-precision sampler (``generation.dtype``) the update's forward also
    measures the sampler's gap (``sampler/*``). Only where the rollout's log-probs
    reach no advantage (the KL as a loss term): the sampler's differ from a
    forward's, and on the first step, where the policy is the reference and equal
    scores leave nothing to learn, Adam would turn that difference into a full
    step (it divides a gradient by its own size).
    """
    r = cfg.rl
    return (r.algorithm == "grpo" and (r.kl_in == "loss" or r.kl_coef == 0) and r.epochs == 1
            and r.minibatch_size == r.prompts_per_step * r.samples_per_prompt)


def policy_update(model, rollout: Rollout, advantages: torch.Tensor, rows: list[int], optimizer, scheduler,
                  cfg: Config, generator: torch.Generator, engine: Engine, step: int) -> list[dict]:
    """``rl.epochs`` passes of the clipped surrogate over shuffled minibatches of ``rows``.

    The normalisers of :func:`~alignkit.losses.aggregation_weights` (sequences and
    tokens of the minibatch) count every micro-batch of every process, so the
    update does not depend on the accumulation or the process count.
    """
    r = cfg.rl
    device = next(model.parameters()).device
    minibatch = r.minibatch_size * engine.num_processes
    pieces = forward_rows(r.forward_rows, r.minibatch_size // cfg.train.grad_accum, device, model)
    lengths = rollout.attention_mask.sum(-1).tolist()
    share_prompts = _shares_prompts(model, cfg, engine)
    groups = rollout.prompt_index.tolist() if share_prompts else None  # a prompt's answers in one piece
    records: list[dict] = []
    model.train()
    for _ in range(r.epochs):
        order = torch.tensor(rows)[torch.randperm(len(rows), generator=generator)].tolist()
        for start in range(0, len(order), minibatch):
            mb = order[start:start + minibatch]
            n_seq, n_tok = float(len(mb)), float(rollout.mask[mb].sum())
            micro = length_pieces(mb, lengths, pieces, engine.num_processes, groups)
            for share in engine.micro_batches(model, micro):
                idx = torch.tensor(share.items)
                mask = rollout.mask[idx].to(device)
                logprobs, _, logits = _forward(model, rollout, idx, device, share_prompts)
                weights = aggregation_weights(mask, r.aggregation, n_seq, n_tok, cfg.generation.max_new_tokens)
                if single_step(cfg):  # the sampling policy is this forward's; rollout.logprobs are the sampler's
                    old = logprobs.detach()
                    sampled = rollout.logprobs[idx].to(device)
                    gap = {"sampler/logprob_gap": float(masked_mean((old - sampled).abs(), mask)),
                           "sampler/kl": float(masked_mean((old - sampled).exp() - 1 - (old - sampled), mask))}
                else:
                    old, gap = rollout.logprobs[idx].to(device), {}
                loss, m = clipped_policy_loss(logprobs, old, advantages[idx].to(device), mask, r.clip_eps_low,
                                              r.clip_eps_high, weights)
                m.update(gap)
                if r.algorithm == "grpo" and r.kl_in == "loss" and r.kl_coef > 0:
                    kl_term, km = kl_loss(logprobs, rollout.ref_logprobs[idx].to(device), mask, weights)
                    loss = loss + r.kl_coef * kl_term
                    m.update(km)
                with torch.no_grad():  # measured, not trained
                    entropy = entropy_from_logits(logits, rollout.temperature)  # the batch's response columns
                    m["entropy"] = float(masked_mean(entropy, mask[:, :entropy.shape[1]]))
                engine.backward(loss * share.weight)
                if share.weight:
                    records.append({**m, "tokens": float(mask.sum())})
            _, grad_norm = engine.step(model, optimizer, scheduler, cfg.train, step)
            if records:
                records[-1]["grad_norm"] = grad_norm
    return records


def dpo_update(model, rollout: Rollout, pairs: list[tuple[int, int]], optimizer, scheduler, cfg: Config,
               generator: torch.Generator, engine: Engine, step: int) -> list[dict]:
    """Online DPO: the DPO (or IPO) loss on this step's fresh pairs against the reference's
    log-probs the rollout recorded, ``rl.epochs`` passes over minibatches of pairs."""
    r = cfg.rl
    device = next(model.parameters()).device
    loss_fn = {"dpo": lambda pc, pr, rc, rr: dpo_loss(pc, pr, rc, rr, r.dpo_beta),
               "ipo": lambda pc, pr, rc, rr: ipo_loss(pc, pr, rc, rr, r.dpo_beta)}[r.dpo_loss]
    minibatch = max(1, r.minibatch_size // 2) * engine.num_processes
    # pairs per piece: half the rows (a pair is two sequences in one forward)
    pieces = max(1, forward_rows(r.forward_rows, r.minibatch_size // cfg.train.grad_accum, device, model) // 2)
    lengths = rollout.attention_mask.sum(-1).tolist()
    pair_lengths = [max(lengths[c], lengths[j]) for c, j in pairs]
    share_prompts = _shares_prompts(model, cfg, engine)  # a pair's two answers run their prompt once
    ref = sequence_logprobs(rollout.ref_logprobs, rollout.mask)
    records: list[dict] = []
    model.train()
    for _ in range(r.epochs):
        order = torch.randperm(len(pairs), generator=generator).tolist()
        for start in range(0, len(order), minibatch):
            mb = order[start:start + minibatch]
            micro = length_pieces(mb, pair_lengths, pieces, engine.num_processes)
            for share in engine.micro_batches(model, micro):
                chosen = torch.tensor([pairs[i][0] for i in share.items])
                rejected = torch.tensor([pairs[i][1] for i in share.items])
                idx = torch.cat([chosen, rejected])
                mask = rollout.mask[idx].to(device)
                logprobs, _, logits = _forward(model, rollout, idx, device, share_prompts)
                seq = sequence_logprobs(logprobs, mask)
                n = len(chosen)
                loss, m = loss_fn(seq[:n], seq[n:], ref[chosen].to(device), ref[rejected].to(device))
                with torch.no_grad():
                    entropy = entropy_from_logits(logits, rollout.temperature)  # the batch's response columns
                    m["entropy"] = float(masked_mean(entropy, mask[:, :entropy.shape[1]]))
                part = n / len(mb) * share.weight  # the loss is a mean over the share's pairs
                engine.backward(loss * part)
                if share.weight:
                    records.append({**m, "tokens": float(mask.sum())})
            _, grad_norm = engine.step(model, optimizer, scheduler, cfg.train, step)
            if records:
                records[-1]["grad_norm"] = grad_norm
    return records


# --------------------------------------------------------------------------- the recipe


@dataclass
class Setup:
    tok: Any
    model: torch.nn.Module  # an ActorCritic without a critic, prepared by the engine
    reference: Any
    reward_fn: Any
    judge: Any
    prompts: list
    prompt_ids: list[list[int]]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    learned_steps: int = 0  # steps with a pair or a non-zero advantage: equal scores in every group give none


def build(cfg: Config, engine: Engine) -> Setup:
    tok = load_tokenizer(cfg.model.name, cfg.model.cache_dir, padding_side="left")
    # rl=True: dropout off, so that the first update's ratio is exactly 1
    policy = load_causal_lm(cfg.model, trainable=True, rl=True, tokenizer=tok)
    model = engine.place(ActorCritic(policy, critic=False))
    reference = reference_forward(model.policy, engine.autocast)
    reward_fn = build_reward(cfg.reward.spec, device=engine.device)
    judge = None
    if cfg.rl.judge:
        from alignkit.eval.metrics import build_pairwise_judge

        judge = build_pairwise_judge(cfg.rl.judge, device=engine.device)
    prompts, prompt_ids = load_prompt_set(cfg.data.prompts, tok, model_context(policy), cfg.generation.max_new_tokens)
    optimizer = build_optimizer(trainable_parameters(model), cfg.train)
    model, optimizer, scheduler = engine.prepare(model, optimizer, build_scheduler(optimizer, cfg.train), cfg.train)
    return Setup(tok, model, reference, reward_fn, judge, prompts, prompt_ids, optimizer, scheduler)


def main(cfg: Config, resume: bool = False) -> dict:
    check_config(cfg)
    engine = Engine(cfg.train.mixed_precision, seed=cfg.run.seed)
    run = RunDir(cfg.run.output_dir, cfg.run.name, STAGE)
    setup = build(cfg, engine)
    start = engine.start(run, cfg, cfg.rl.steps, resume, setup.model)
    if start.done:
        return json.loads((run.path / "DONE").read_text() or "{}")
    r = cfg.rl
    engine.print(f"rl ({r.algorithm}): {len(setup.prompts)} prompts, {r.prompts_per_step} x {r.samples_per_prompt} "
                 f"samples per step x {engine.num_processes} process(es), {r.steps} steps, reward "
                 f"{setup.reward_fn.name}")
    last = run_steps(engine, run, start.step + 1, r.steps, lambda step: rl_step(step, cfg, setup, engine),
                     cfg.train, f"rl {r.algorithm}")
    if start.step == 0 and not setup.learned_steps:
        # Not a success: the policy is the model it started from (a reward that scores every
        # answer alike, or answers all the same, leaves every advantage 0 and no pair).
        raise AlignkitError(f"rl ({r.algorithm}): no step of the {r.steps} had anything to learn (every group's "
                            f"scores were equal, or no pair differed), so the policy was never updated; check "
                            f"reward.spec ({setup.reward_fn.name}) and generation.temperature")
    engine.save_final(engine.unwrap(setup.model).policy, setup.tok, run.final,
                      extra={"stage": STAGE, "algorithm": r.algorithm, "base": cfg.model.name,
                             "reward": str(cfg.reward.spec), "steps": r.steps})
    summary = finish_run(engine, run, r.steps, last)
    engine.print(f"rl ({r.algorithm}): done; policy in {run.final}")
    return summary


def rl_step(step: int, cfg: Config, setup: Setup, engine: Engine) -> tuple[dict, list[dict]]:
    """One iteration: rollout, score, advantages (or pairs), update.

    Returns its metrics and the update's per-micro-batch records (this process's).
    """
    r = cfg.rl
    idx = prompt_batch(len(setup.prompts), r.prompts_per_step * engine.num_processes, cfg.run.seed, step)
    batch_prompts = [setup.prompts[i].prompt for i in idx]
    batch_kinds = [setup.prompts[i].kind for i in idx]

    # 1. rollout (no grad): G answers per prompt, their log-probs and the reference's
    t0 = time.perf_counter()
    rollout = ppo_rollout(setup.model, setup.tok, [setup.prompt_ids[i] for i in idx], cfg.generation,
                          reference=setup.reference, n=r.samples_per_prompt,
                          forward_batch_size=forward_rows(r.forward_rows, r.minibatch_size // cfg.train.grad_accum,
                                                          engine.device, setup.model),
                          seed=cfg.run.seed * 1_000_003 + step, engine=engine, score_policy=not single_step(cfg))
    t1 = time.perf_counter()

    # 2. score
    scores, raw = score_rollout(setup.reward_fn, batch_prompts, rollout, cfg.reward.no_eos_penalty, engine,
                                kinds=batch_kinds)
    t2 = time.perf_counter()

    # 3. advantages (or pairs), 4. update
    generator = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step)
    lr = setup.scheduler.get_last_lr()[0]
    extra: dict[str, float] = {}
    if r.algorithm == "online_dpo":
        pairs, ties = pick_pairs(cfg, rollout, scores, setup.judge, batch_prompts, engine)
        extra.update(pairs=float(len(pairs)), tied_pairs=float(ties))
        records = dpo_update(setup.model, rollout, pairs, setup.optimizer, setup.scheduler, cfg, generator, engine,
                             step) if pairs else []
        learned = bool(pairs)
    else:
        advantages, _ = rollout_advantages(cfg, rollout, scores)
        rows = list(range(len(rollout)))
        if r.filter_uniform_groups and r.algorithm in ("grpo", "rloo"):
            flat = uniform_groups(scores, r.samples_per_prompt)
            rows = [i for i in rows if not flat[i // r.samples_per_prompt]]
            extra["filtered_groups"] = float(flat.sum())
        records = policy_update(setup.model, rollout, advantages, rows, setup.optimizer, setup.scheduler, cfg,
                                generator, engine, step) if rows else []
        # Equal scores in every group leave every advantage 0 (up to the rounding of their mean);
        # the update then only follows float noise (a k3 KL term of a policy that is the reference).
        learned = bool(rows) and float(advantages[rows].abs().max()) > NO_ADVANTAGE
    t3 = time.perf_counter()
    setup.learned_steps += learned

    mask = rollout.mask
    seq_kl = ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(-1)
    n_tokens = int(mask.sum())
    metrics = {
        "score/mean": scores.mean().item(),
        "score/std": scores.std().item() if len(scores) > 1 else 0.0,
        "score/raw_mean": raw.mean().item(),
        **kind_scores(batch_kinds, rollout, scores),
        "kl": seq_kl.mean().item(),
        "kl_coef": r.kl_coef,
        **mean_metrics(records, engine),
        **extra,
        "response_length": rollout.lengths.float().mean().item(),
        "no_eos_share": 1.0 - rollout.finished.float().mean().item(),
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
