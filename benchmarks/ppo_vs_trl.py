"""Seconds per PPO step and peak memory: alignkit against TRL's PPOTrainer, same work.

    pip install trl==1.12.0          # TRL's PPO trainer last shipped in 1.12 (trl.experimental.ppo)
    .venv/bin/python benchmarks/ppo_vs_trl.py                 # SmolLM2-135M, 4 steps each
    .venv/bin/python benchmarks/ppo_vs_trl.py --steps 6 --lora
    .venv/bin/python benchmarks/ppo_vs_trl.py --steps 6 --recommended     # each library's LoRA set-up

Both sides run in child processes of this one, one after the other, on the same
setting: the built-in SmolLM2-135M-Instruct as policy (full fine-tuning, or LoRA
r=16 on all linear layers with ``--lora``), a separate value model initialised
from it and trained in full (TRL's only option), a reward model that is SmolLM2
with a one-output score head (the same folder for both, written here), 16
red-team prompts per step, responses of at most 40 tokens at temperature 0.7
from the full softmax, 2 PPO epochs over minibatches of 8, forward passes of 8
rows, KL coefficient 0.05, fp32, Adam at 1e-5. A step is one rollout (sampling,
policy / reference / value / reward forwards) plus its update.

Per-step time: for TRL the time between its ``on_step_end`` callbacks, for
alignkit the sum of the step's phases (``time/rollout + time/score +
time/update`` in metrics.jsonl); the first step (warm-up) is left out and the
median of the others is printed. Peak memory is each child's maximum resident
set size. Numbers from a noisy machine: run it twice.

``--recommended`` compares each library's recommended set-up for a LoRA policy instead of
equal work: alignkit's defaults (the value head on the policy's trunk, the reference by
switching the adapter off) against TRL's (a separate value model trained in full, the
reference by adapter switch), same prompts, lengths, rollout and minibatch sizes and number
of optimizer passes. So that speed is not bought with learning, both sides then answer the
same 32 held-out red-team prompts once (same seed, alignkit's sampler) with their trained
policy and the reward model scores the answers: the mean is printed as the held-out score.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICY = "builtin:smollm2-135m-instruct"
PROMPTS, RESPONSE_TOKENS, TEMPERATURE, KL_COEF, LR = 16, 40, 0.7, 0.05, 1e-5
MINIBATCH, PPO_EPOCHS, FORWARD_BATCH = 8, 2, 8
HELD_OUT = 32
EXTRA_ENV = "PPO_VS_TRL_SET"  # how --set reaches the alignkit child


def write_reward_model(folder: Path) -> None:
    """SmolLM2 with a seeded one-output score head: a stand-in reward model that costs what a real one costs."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.models import resolve

    path = resolve(POLICY)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    tok = AutoTokenizer.from_pretrained(path)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def prompt_messages(n: int) -> list:
    from alignkit.data.formats import load_prompts

    return [p.prompt for p in load_prompts("builtin:prompts", split="train", kind="red_team", limit=n)]


def held_out_score(policy, tok, reward_folder: Path) -> float:
    """Mean reward of one answer to each of the held-out red-team prompts (fixed seed, same sampler)."""
    from alignkit.config import GenerationConfig
    from alignkit.data.formats import load_prompts
    from alignkit.rewards import build_reward
    from alignkit.rollout import generate

    prompts = [p.prompt for p in load_prompts("builtin:prompts", split="test", kind="red_team", limit=HELD_OUT)]
    gen = GenerationConfig(max_new_tokens=RESPONSE_TOKENS, temperature=TEMPERATURE, batch_size=HELD_OUT)
    answers = [g.text for g in generate(policy, tok, prompts, gen, seed=1234)]
    return float(build_reward(f"rm:{reward_folder}")(prompts, answers).mean())


def run_alignkit(reward_folder: Path, steps: int, lora: bool, out: Path, recommended: bool = False) -> dict:
    from alignkit.config import ModelConfig, load_config
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.recipes import ppo
    from alignkit.runs import read_metrics

    value = (["value.mode=shared"] if recommended else  # alignkit's default: a value head on the policy's trunk
             ["value.mode=separate", "value.init=policy", "value.lora.enabled=false",
              f"value.learning_rate={LR}"])  # TRL trains its value model in full
    overrides = [
        f"model.name={POLICY}", f"model.lora.enabled={str(lora).lower()}", "model.lora.r=16", "model.lora.alpha=32",
        f"reward.spec=rm:{reward_folder}", *value,
        "data.prompts.path=builtin:prompts", "data.prompts.kind=red_team",
        f"generation.max_new_tokens={RESPONSE_TOKENS}", f"generation.temperature={TEMPERATURE}",
        f"generation.batch_size={PROMPTS}", f"ppo.steps={steps}", f"ppo.rollout_batch_size={PROMPTS}",
        f"ppo.minibatch_size={MINIBATCH}", f"ppo.ppo_epochs={PPO_EPOCHS}", f"ppo.kl.coef={KL_COEF}",
        f"train.learning_rate={LR}", "train.save_every=0", "train.log_every=1", f"run.output_dir={out}",
        *os.environ.get(EXTRA_ENV, "").split(),  # --set: alignkit's side only
    ]
    cfg = load_config(ppo.Config, None, overrides)
    ppo.main(cfg)
    final = out / cfg.run.name / "ppo" / "final"  # merged weights: plain transformers loads them
    rows = read_metrics(out / cfg.run.name / "ppo")
    result = {"step_s": [r["time/rollout"] + r["time/score"] + r["time/update"] for r in rows],
              "phases": {k: [r[f"time/{k}"] for r in rows] for k in ("rollout", "score", "update")},
              "sampler_gap": [r["sampler/logprob_gap"] for r in rows if "sampler/logprob_gap" in r]}
    if recommended:
        tok = load_tokenizer(POLICY)
        result["held_out"] = held_out_score(load_causal_lm(ModelConfig(name=str(final)), trainable=False,
                                                           tokenizer=tok), tok, reward_folder)
    return result


def run_trl(reward_folder: Path, steps: int, lora: bool, out: Path, recommended: bool = False) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from alignkit.data.collate import encode_prompt
    from alignkit.models import resolve

    path = resolve(POLICY)
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    ids = [encode_prompt(tok, m) for m in prompt_messages(PROMPTS)]  # rendered as alignkit renders them
    dataset = Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = None if lora else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    value.config.pad_token_id = tok.pad_token_id
    reward = AutoModelForSequenceClassification.from_pretrained(reward_folder, dtype=torch.float32)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    args = PPOConfig(
        # TRL's rollout is per_device_train_batch_size x gradient_accumulation_steps, split into
        # num_mini_batches; micro-batches of 8 give the same forward/backward work as ours (its
        # optimizer then steps once per 2 micro-batches: 2 steps per PPO step to our 4).
        output_dir=str(out), per_device_train_batch_size=MINIBATCH, gradient_accumulation_steps=PROMPTS // MINIBATCH,
        num_mini_batches=PROMPTS // MINIBATCH, num_ppo_epochs=PPO_EPOCHS, total_episodes=PROMPTS * steps,
        response_length=RESPONSE_TOKENS, temperature=TEMPERATURE, local_rollout_forward_batch_size=FORWARD_BATCH,
        kl_coef=KL_COEF, learning_rate=LR, num_sample_generations=0, report_to=[], save_strategy="no",
        logging_steps=1, stop_token="eos", missing_eos_penalty=None, use_cpu=True, bf16=False, fp16=False,
        seed=0, dataloader_num_workers=0,
    )
    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *a, **kw):
            ends.append(time.perf_counter())

    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=dataset, value_model=value, peft_config=peft_config, callbacks=[StepClock()])
    start = time.perf_counter()
    trainer.train()
    marks = [start, *ends]
    result = {"step_s": [b - a for a, b in zip(marks, marks[1:])]}
    if recommended:
        policy = trainer.model.policy if hasattr(trainer.model, "policy") else trainer.model
        result["held_out"] = held_out_score(policy, tok, reward_folder)
    return result


def child(side: str, reward_folder: Path, steps: int, lora: bool, threads: int, recommended: bool = False) -> None:
    os.environ.setdefault("ALIGNKIT_NO_PROGRESS", "1")
    import torch

    from alignkit.models import quiet_transformers

    quiet_transformers()
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        result = (run_alignkit if side == "alignkit" else run_trl)(reward_folder, steps, lora, Path(out), recommended)
    print("RESULT " + json.dumps(result), flush=True)


def launch(side: str, reward_folder: Path, steps: int, lora: bool, threads: int, recommended: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--reward-folder", str(reward_folder), "--steps", str(steps),
           "--threads", str(threads)] + (["--lora"] if lora else []) + (["--recommended"] if recommended else [])
    wall0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    # wait4 rather than wait: it hands back this child's own resource usage (peak RSS)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - wall0
    if proc.returncode:
        raise SystemExit(f"{side} failed with exit code {proc.returncode}")
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(lines[-1][len("RESULT "):])
    result.update(wall_s=wall, peak_rss_mib=usage.ru_maxrss / 1024)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="PPO steps per side (the first is warm-up)")
    p.add_argument("--lora", action="store_true", help="LoRA r=16 on the policy instead of full fine-tuning")
    p.add_argument("--recommended", action="store_true",
                   help="each library's recommended LoRA set-up (implies --lora), and the held-out score")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an alignkit config override for its side only, e.g. generation.dtype=bfloat16")
    p.add_argument("--side", choices=("alignkit", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--reward-folder", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.lora = args.lora or args.recommended
    if args.set:
        os.environ[EXTRA_ENV] = " ".join(args.set)
    if args.side:
        child(args.side, args.reward_folder, args.steps, args.lora, args.threads, args.recommended)
        return 0
    if importlib.util.find_spec("trl") is None:
        raise SystemExit("ppo_vs_trl: TRL is not installed; pip install -e '.[bench]' (trl==1.12.0)")

    from alignkit.models import quiet_transformers

    quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        reward_folder = Path(tmp) / "reward-model"
        write_reward_model(reward_folder)
        results = {}
        for side in ("alignkit", "trl"):
            print(f"running {side} ...", flush=True)
            results[side] = launch(side, reward_folder, args.steps, args.lora, args.threads, args.recommended)

    setup = ("each library's recommended set-up (alignkit: value head on the trunk; TRL: separate value model)"
             if args.recommended else "separate value model") + (f"; alignkit with {' '.join(args.set)}"
                                                                  if args.set else "")
    print(f"\nPPO on {POLICY} ({'LoRA r=16' if args.lora else 'full fine-tuning'}), {setup}, "
          f"SmolLM2 reward model; {PROMPTS} prompts x <= {RESPONSE_TOKENS} tokens, {PPO_EPOCHS} epochs of "
          f"minibatch {MINIBATCH}; {args.steps} steps; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'':10} {'median s/step':>14} {'steps (s)':>30} {'wall s':>8} {'peak RSS MiB':>13}")
    for side, r in results.items():
        later = r["step_s"][1:] or r["step_s"]
        r["median"] = statistics.median(later)
        steps = " ".join(f"{x:.1f}" for x in r["step_s"])
        print(f"{side:10} {r['median']:>14.2f} {steps:>30} {r['wall_s']:>8.1f} {r['peak_rss_mib']:>13.0f}")
    ours, theirs = results["alignkit"], results["trl"]
    print(f"TRL / alignkit: time per step x{theirs['median'] / ours['median']:.2f}; "
          f"peak memory alignkit / TRL x{ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}; episodes/s "
          f"{PROMPTS / ours['median']:.2f} vs {PROMPTS / theirs['median']:.2f}")
    phases = ours["phases"]
    print("alignkit phases (median s, steps 2-): " + ", ".join(
        f"{k} {statistics.median(v[1:] or v):.2f}" for k, v in phases.items()))
    if ours.get("sampler_gap"):
        print(f"alignkit sampler/logprob_gap (mean over steps): {statistics.mean(ours['sampler_gap']):.4f}")
    if args.recommended:
        print(f"held-out score ({HELD_OUT} red-team test prompts, the reward model): alignkit "
              f"{ours['held_out']:.4f}, TRL {theirs['held_out']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
