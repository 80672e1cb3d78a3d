"""Seconds per PPO step and peak memory: alignkit against TRL's PPOTrainer, same work.

    pip install trl==1.12.0          # TRL's PPO trainer last shipped in 1.12 (trl.experimental.ppo)
    .venv/bin/python benchmarks/ppo_vs_trl.py                 # SmolLM2-135M, 4 steps each
    .venv/bin/python benchmarks/ppo_vs_trl.py --steps 6 --lora
    .venv/bin/python benchmarks/ppo_vs_trl.py --steps 6 --recommended     # each library's LoRA set-up
    python3 benchmarks/ppo_vs_trl.py --recommended --gpu --model /tmp/smollm2-shaped --prompts 64 --tokens 128

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

Utilisation: each side then runs 2 more steps under torch's ``FlopCounterMode``, which
counts every forward and backward the step runs (sampling, scoring, update: TRL's extra
value model and scoring forward count for TRL); those FLOPs per step over the side's median
step time, against the matmul rate measured here (``compare.matmul_peak``), as a
percentage. ``--no-utilisation`` skips the counted runs.

``--gpu`` runs both sides on CUDA with bf16 autocast (TRL's ``bf16=True``; alignkit's
``train.mixed_precision=bf16``, and its sampler from a bf16 copy with a static KV cache,
``generation.dtype=bfloat16 generation.cache=static``, its log-prob gap printed); peak
memory is then the most the CUDA allocator held. ``--model`` takes any folder transformers
loads (``benchmarks/shapes.py model`` writes SmolLM2's shape with random weights, for a
machine the built-in package cannot reach); ``--prompts``, ``--tokens`` and
``--minibatch`` set the rollout and minibatch sizes.

``--recommended`` compares each library's recommended set-up for a LoRA policy instead of
equal work: alignkit's defaults (the value head on the policy's trunk, the reference by
switching the adapter off) against TRL's (a separate value model trained in full, the
reference by adapter switch), same prompts, lengths, rollout and minibatch sizes and number
of optimizer passes. So that speed is not bought with learning, the start policy and both
trained policies then answer every held-out red-team prompt 4 times (the same seeds,
alignkit's sampler) and the reward model scores the answers: the means are printed with
paired differences by prompt (bootstrap 95% intervals, Wilcoxon p), alignkit against TRL
and each against the start.
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from compare import COUNTED_STEPS, counted_flops, matmul_peak  # this folder's; the child processes run from it too

ROOT = Path(__file__).resolve().parents[1]
POLICY = "builtin:smollm2-135m-instruct"
TEMPERATURE, KL_COEF, LR, PPO_EPOCHS = 0.7, 0.05, 1e-5, 2
HELD_OUT_SAMPLES = 4  # answers per held-out prompt (every red-team test prompt), each with its own seed
GPU_SET = ["train.mixed_precision=bf16", "generation.dtype=bfloat16", "generation.cache=static"]


@dataclass(frozen=True)
class Bench:
    """What both sides run: the model, the sizes, the device (travels to the children as JSON)."""

    steps: int = 4
    lora: bool = False
    recommended: bool = False
    model: str = POLICY
    prompts: int = 16  # per rollout
    tokens: int = 40  # at most, per response
    minibatch: int = 8  # also the rows of each rollout forward
    gpu: bool = False
    threads: int = 0
    overrides: tuple[str, ...] = ()  # --set: alignkit's side only
    counted: bool = False  # a run under torch's FLOP counter, for utilisation: no held-out score


def write_reward_model(folder: Path, policy: str) -> None:
    """The policy's model with a seeded one-output score head: a stand-in reward model that costs what a real
    one costs."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.models import resolve

    path = resolve(policy)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    tok = AutoTokenizer.from_pretrained(path)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def prompt_messages(n: int) -> list:
    from alignkit.data.formats import load_prompts

    return [p.prompt for p in load_prompts("builtin:prompts", split="train", kind="red_team", limit=n)]


def held_out_scores(policy, tok, reward_folder: Path, b: Bench) -> list[float]:
    """Per held-out red-team prompt, the reward model's mean score of ``HELD_OUT_SAMPLES`` answers (fixed seeds,
    alignkit's sampler for every policy, so that the policies are what differs)."""
    from alignkit.config import GenerationConfig
    from alignkit.data.formats import load_prompts
    from alignkit.rewards import build_reward
    from alignkit.rollout import generate

    prompts = [p.prompt for p in load_prompts("builtin:prompts", split="test", kind="red_team")]
    gen = GenerationConfig(max_new_tokens=b.tokens, temperature=TEMPERATURE, batch_size=len(prompts))
    reward = build_reward(f"rm:{reward_folder}")
    per_seed = [reward(prompts, [g.text for g in generate(policy, tok, prompts, gen, seed=1234 + k)])
                for k in range(HELD_OUT_SAMPLES)]
    return [float(sum(scores[i] for scores in per_seed) / HELD_OUT_SAMPLES) for i in range(len(prompts))]


def run_alignkit(reward_folder: Path, b: Bench, out: Path) -> dict:
    from alignkit.config import ModelConfig, load_config
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.recipes import ppo
    from alignkit.runs import read_metrics

    value = (["value.mode=shared"] if b.recommended else  # alignkit's default: a value head on the policy's trunk
             ["value.mode=separate", "value.init=policy", "value.lora.enabled=false",
              f"value.learning_rate={LR}"])  # TRL trains its value model in full
    overrides = [
        f"model.name={b.model}", f"model.lora.enabled={str(b.lora).lower()}", "model.lora.r=16", "model.lora.alpha=32",
        f"reward.spec=rm:{reward_folder}", *value,
        "data.prompts.path=builtin:prompts", "data.prompts.kind=red_team",
        f"generation.max_new_tokens={b.tokens}", f"generation.temperature={TEMPERATURE}",
        f"generation.batch_size={b.prompts}", f"ppo.steps={b.steps}", f"ppo.rollout_batch_size={b.prompts}",
        f"ppo.minibatch_size={b.minibatch}", f"ppo.ppo_epochs={PPO_EPOCHS}", f"ppo.kl.coef={KL_COEF}",
        f"train.learning_rate={LR}", "train.save_every=0", "train.log_every=1", f"run.output_dir={out}",
        *(GPU_SET if b.gpu else []), *b.overrides,
    ]
    cfg = load_config(ppo.Config, None, overrides)
    ppo.main(cfg)
    final = out / cfg.run.name / "ppo" / "final"  # merged weights: plain transformers loads them
    rows = read_metrics(out / cfg.run.name / "ppo")
    result = {"step_s": [r["time/rollout"] + r["time/score"] + r["time/update"] for r in rows],
              "phases": {k: [r[f"time/{k}"] for r in rows] for k in ("rollout", "score", "update")},
              "sampler_gap": [r["sampler/logprob_gap"] for r in rows if "sampler/logprob_gap" in r]}
    if b.recommended and not b.counted:
        tok = load_tokenizer(b.model)
        policy = load_causal_lm(ModelConfig(name=str(final)), trainable=False, tokenizer=tok)
        result["held_out"] = held_out_scores(policy.to(_device(b)), tok, reward_folder, b)
    return result


def run_trl(reward_folder: Path, b: Bench, out: Path) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from alignkit.data.collate import encode_prompt
    from alignkit.models import resolve

    path = resolve(b.model)
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    ids = [encode_prompt(tok, m) for m in prompt_messages(b.prompts)]  # rendered as alignkit renders them
    dataset = Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = None if b.lora else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    value.config.pad_token_id = tok.pad_token_id
    reward = AutoModelForSequenceClassification.from_pretrained(reward_folder, dtype=torch.float32)
    peft_config = None
    if b.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    args = PPOConfig(
        # TRL's rollout is per_device_train_batch_size x gradient_accumulation_steps, split into
        # num_mini_batches; micro-batches of the minibatch size give the same forward/backward work
        # as ours (its optimizer steps once per gradient_accumulation_steps micro-batches).
        output_dir=str(out), per_device_train_batch_size=b.minibatch,
        gradient_accumulation_steps=b.prompts // b.minibatch, num_mini_batches=b.prompts // b.minibatch,
        num_ppo_epochs=PPO_EPOCHS, total_episodes=b.prompts * b.steps, response_length=b.tokens,
        temperature=TEMPERATURE, local_rollout_forward_batch_size=b.minibatch, kl_coef=KL_COEF, learning_rate=LR,
        num_sample_generations=0, report_to=[], save_strategy="no", logging_steps=1, stop_token="eos",
        missing_eos_penalty=None, use_cpu=not b.gpu, bf16=b.gpu, fp16=False,
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
    result = {"step_s": [t1 - t0 for t0, t1 in zip(marks, marks[1:])]}
    if b.recommended and not b.counted:
        policy = trainer.model.policy if hasattr(trainer.model, "policy") else trainer.model
        result["held_out"] = held_out_scores(policy, tok, reward_folder, b)
    return result


def _device(b: Bench):
    import torch

    return torch.device("cuda" if b.gpu else "cpu")


def child(side: str, reward_folder: Path, b: Bench) -> None:
    os.environ.setdefault("ALIGNKIT_NO_PROGRESS", "1")
    import torch

    from alignkit.models import quiet_transformers

    quiet_transformers()
    if b.threads:
        torch.set_num_threads(b.threads)
    run = run_alignkit if side == "alignkit" else run_trl
    with tempfile.TemporaryDirectory() as out:
        if b.counted:
            result = {"flops": counted_flops(lambda: run(reward_folder, b, Path(out))) / b.steps}
        else:
            result = run(reward_folder, b, Path(out))
    if b.gpu:
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def launch(side: str, reward_folder: Path, b: Bench) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--reward-folder", str(reward_folder),
           "--bench", json.dumps(asdict(b))]
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


def start_scores(reward_folder: Path, b: Bench) -> list[float]:
    """The untrained policy's held-out scores: where both sides began."""
    from alignkit.config import ModelConfig
    from alignkit.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(b.model)
    policy = load_causal_lm(ModelConfig(name=b.model), trainable=False, tokenizer=tok)
    return held_out_scores(policy.to(_device(b)), tok, reward_folder, b)


def print_held_out(ours: list[float], theirs: list[float], start: list[float], b: Bench) -> None:
    """Means and paired differences (bootstrap 95% intervals, Wilcoxon p) over the held-out prompts."""
    from alignkit.eval.stats import paired_difference_ci

    def change(before, after) -> str:
        d = paired_difference_ci(before, after)
        return f"{d.mean_difference:+.4f} [{d.low:+.4f}, {d.high:+.4f}], p={d.wilcoxon_pvalue:.2f}"

    print(f"held-out score ({len(start)} red-team test prompts x {HELD_OUT_SAMPLES} answers, the reward model; "
          f"{b.steps} steps): start {sum(start) / len(start):.4f}; alignkit {sum(ours) / len(ours):.4f} "
          f"(vs start {change(start, ours)}); TRL {sum(theirs) / len(theirs):.4f} (vs start {change(start, theirs)}); "
          f"alignkit - TRL {change(theirs, ours)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=Bench.steps, help="PPO steps per side (the first is warm-up)")
    p.add_argument("--lora", action="store_true", help="LoRA r=16 on the policy instead of full fine-tuning")
    p.add_argument("--recommended", action="store_true",
                   help="each library's recommended LoRA set-up (implies --lora), and the held-out score")
    p.add_argument("--model", default=Bench.model, help="the policy (and value and reward models' start): "
                   "a built-in name or a folder")
    p.add_argument("--prompts", type=int, default=Bench.prompts, help="prompts per rollout")
    p.add_argument("--tokens", type=int, default=Bench.tokens, help="most tokens per response")
    p.add_argument("--minibatch", type=int, default=Bench.minibatch,
                   help="rows per minibatch and per rollout forward (divides --prompts)")
    p.add_argument("--gpu", action="store_true", help="CUDA with bf16 autocast on both sides")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--no-utilisation", action="store_true",
                   help="skip the counted runs (COUNTED_STEPS steps a side) that give each side's FLOPs per step")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an alignkit config override for its side only, e.g. generation.dtype=bfloat16")
    p.add_argument("--side", choices=("alignkit", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--reward-folder", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--bench", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        fields = json.loads(args.bench)
        child(args.side, args.reward_folder, Bench(**{**fields, "overrides": tuple(fields["overrides"])}))
        return 0
    if args.prompts % args.minibatch:
        raise SystemExit(f"ppo_vs_trl: --minibatch {args.minibatch} must divide --prompts {args.prompts}")
    b = Bench(steps=args.steps, lora=args.lora or args.recommended, recommended=args.recommended, model=args.model,
              prompts=args.prompts, tokens=args.tokens, minibatch=args.minibatch, gpu=args.gpu, threads=args.threads,
              overrides=tuple(args.set))
    if importlib.util.find_spec("trl") is None:
        raise SystemExit("ppo_vs_trl: TRL is not installed; pip install -e '.[bench]' (trl==1.12.0)")

    from alignkit.models import quiet_transformers

    quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        reward_folder = Path(tmp) / "reward-model"
        write_reward_model(reward_folder, b.model)
        results = {}
        for side in ("alignkit", "trl"):
            print(f"running {side} ...", flush=True)
            results[side] = launch(side, reward_folder, b)
        start = None
        if b.recommended:
            print("scoring the start policy on the held-out prompts ...", flush=True)
            start = start_scores(reward_folder, b)
        if not args.no_utilisation:
            for side in ("alignkit", "trl"):
                print(f"counting {side}'s FLOPs ...", flush=True)
                results[side]["flops"] = launch(side, reward_folder, replace(b, steps=COUNTED_STEPS, counted=True))["flops"]

    extra = [*(GPU_SET if b.gpu else []), *b.overrides]
    setup = ("each library's recommended set-up (alignkit: value head on the trunk; TRL: separate value model)"
             if b.recommended else "separate value model") + (f"; alignkit with {' '.join(extra)}" if extra else "")
    where = ("CUDA, bf16 autocast" if b.gpu else f"fp32, {os.cpu_count()} CPUs") + \
        f", load average {os.getloadavg()[0]:.1f}"
    memory = "peak CUDA MiB" if b.gpu else "peak RSS MiB"
    print(f"\nPPO on {b.model} ({'LoRA r=16' if b.lora else 'full fine-tuning'}), {setup}, "
          f"reward model of the same shape; {b.prompts} prompts x <= {b.tokens} tokens, {PPO_EPOCHS} epochs of "
          f"minibatch {b.minibatch}; {b.steps} steps; {where}")
    print(f"{'':10} {'median s/step':>14} {'steps (s)':>30} {'wall s':>8} {memory:>13}")
    for side, r in results.items():
        later = r["step_s"][1:] or r["step_s"]
        r["median"] = statistics.median(later)
        r["peak"] = r["peak_cuda_mib"] if b.gpu else r["peak_rss_mib"]
        steps = " ".join(f"{x:.1f}" for x in r["step_s"])
        print(f"{side:10} {r['median']:>14.2f} {steps:>30} {r['wall_s']:>8.1f} {r['peak']:>13.0f}")
    ours, theirs = results["alignkit"], results["trl"]
    print(f"TRL / alignkit: time per step x{theirs['median'] / ours['median']:.2f}; "
          f"peak memory alignkit / TRL x{ours['peak'] / theirs['peak']:.2f}; episodes/s "
          f"{b.prompts / ours['median']:.2f} vs {b.prompts / theirs['median']:.2f}")
    phases = ours["phases"]
    print("alignkit phases (median s, steps 2-): " + ", ".join(
        f"{k} {statistics.median(v[1:] or v):.2f}" for k, v in phases.items()))
    if ours.get("sampler_gap"):
        print(f"alignkit sampler/logprob_gap (mean over steps): {statistics.mean(ours['sampler_gap']):.4f}")
    if not args.no_utilisation:
        peak = matmul_peak(b.gpu)
        print(f"utilisation (the FLOPs a side's step runs, sampling included, counted over {COUNTED_STEPS} steps of its "
              f"own, over its median step time), against a {'bf16' if b.gpu else 'fp32'} matmul peak of "
              f"{peak / 1e9:.0f} GFLOP/s: alignkit {ours['flops'] / 1e9:.0f} GFLOP/step, "
              f"{ours['flops'] / ours['median'] / peak:.0%}; TRL {theirs['flops'] / 1e9:.0f} GFLOP/step, "
              f"{theirs['flops'] / theirs['median'] / peak:.0%}")
    if b.recommended:
        print_held_out(ours["held_out"], theirs["held_out"], start, b)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
