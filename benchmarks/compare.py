"""alignkit against TRL on the same work, side by side in one run: PPO, GRPO, DPO, reward models, sampling.

    pip install -e '.[bench]'                                   # TRL 1.12
    .venv/bin/python benchmarks/compare.py                      # all parts, about an hour on 2 CPU cores
    .venv/bin/python benchmarks/compare.py --parts dpo,rm-minilm --steps 8
    .venv/bin/python benchmarks/compare.py --parts generation --batches 8,32,64
    python3 benchmarks/compare.py --gpu --model /tmp/smollm2-shaped --parts grpo-bf16,dpo --steps 6

Each side runs in a child process of this one, one after the other, so that peak memory
(resident set size; the device's allocator on a GPU) is its own, on the same model,
data, batch size, lengths, precision (fp32) and number of optimizer steps:

- ``ppo-recommended``, ``ppo`` (and ``ppo-lora``): ``benchmarks/ppo_vs_trl.py`` against TRL
  1.12's ``PPOTrainer``: each library's recommended set-up for a LoRA policy with the
  held-out score after the same steps, and equal work (a separate value model on both
  sides; full fine-tuning, or a LoRA policy), 4 steps each, with alignkit's phases.
- ``dpo``: SmolLM2-135M-Instruct with LoRA r=16 on every linear layer, batch 4 pairs,
  sequences cut at 128 tokens, beta 0.1, against TRL's ``DPOTrainer`` with its reference
  by adapter switch. Each side's own way with the reference: alignkit computes the
  reference log-probs once before training (a cache, counted in the whole-run time),
  TRL computes them in every step (its default).
- ``rm``: reward-model training, the built-in MiniLM-L6 encoder in full and SmolLM2 with
  LoRA r=16, batch 8 pairs, 128 tokens, against TRL's ``RewardTrainer``.
- ``grpo``: GRPO with SmolLM2 and LoRA r=16 against TRL's ``GRPOTrainer`` (transformers
  generation on both sides): 4 red-team prompts x 4 answers of at most 40 tokens per step at
  temperature 0.7, one optimizer step per rollout over micro-batches of 8, one pass, KL weight
  0.04 with the reference by adapter switch, the reward ``min(words / 40, 1)`` on both sides.
- ``generation``: tokens per second of alignkit's sampler against plain
  ``model.generate(do_sample=True)`` from the same distribution, SmolLM2-135M's shape, batch
  8, 32 and 64, fp32 and bf16 (``benchmarks/generation.py``).

``--gpu`` runs both sides on CUDA with bf16 autocast (TRL's ``bf16=True``, alignkit's
``train.mixed_precision=bf16``; ``grpo-bf16`` then samples from alignkit's bf16 copy with a
static KV cache), GRPO at 16 prompts x 4 answers of 128 tokens and PPO at 64 prompts x 128
tokens; peak memory is then the most the CUDA allocator held, utilisation is against the bf16
matmul rate. ``--model`` replaces SmolLM2 with a folder (``benchmarks/shapes.py model`` writes
its exact shape with random weights, for a machine the built-in package cannot reach).

Utilisation: for TRL's DPO and reward models, the FLOPs of the plain step (torch's
``FlopCounterMode`` over the trained model's forward and backward on the step's rows at
their mean padded length); for alignkit's, the same mode over its own step (with a
causal model each pair's prompt runs once); DPO's reference forward not counted on
either side, since it can be computed once; each over that side's time per step, against the fp32 matmul rate measured in the same
run (2048 x 2048 products). For GRPO and PPO, whose work depends on what was sampled, the
FLOPs each side's steps run, sampling, scoring and update together, counted by the same
mode over a run of their own (2 steps; counting slows every operation, so it is not the
timed run), over that side's median step time.

Gradient checkpointing is off on both sides (TRL turns it on by default: with it, TRL
recomputes activations and uses less memory; ``COMPARE_GRADIENT_CHECKPOINTING=1`` turns it
on for both), and dropout is what alignkit does on both: off for DPO, the model's own for
reward models (MiniLM's 0.1; TRL's default turns it off).

Per step: alignkit's ``time/step`` (end of one optimizer step to the end of the next) and
TRL's time between ``on_step_end`` callbacks; the first step pays for warm-up and is left
out of the median. Ratios are alignkit over TRL in steps per second (above 1: alignkit is
faster) and in peak memory (below 1: lighter). The pairs are alignkit's synthetic
polite-vs-rude set, the same lines for both sides. A quiet machine matters: the load
average is printed with the table.
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
# --gpu and --model reach the child processes through the environment, as the checkpointing switch does
GPU = os.environ.get("COMPARE_GPU", "0") == "1"
POLICY = os.environ.get("COMPARE_MODEL") or "builtin:smollm2-135m-instruct"
ENCODER = "builtin:minilm-l6"
MAX_LENGTH, LR, BETA, LORA_R, LORA_ALPHA = 128, 1e-5, 0.1, 16, 32
GRADIENT_CHECKPOINTING = os.environ.get("COMPARE_GRADIENT_CHECKPOINTING", "0") == "1"
# alignkit's precision on a GPU; TRL's is bf16=True there
GPU_SET = ["train.mixed_precision=bf16"] if GPU else []
GRPO_PROMPTS, GRPO_G, GRPO_TOKENS = (16, 4, 128) if GPU else (4, 4, 40)
GRPO_TEMPERATURE, GRPO_BETA, LENGTH_TARGET = 0.7, 0.04, 40
SETTINGS = {  # part -> (model, lora, batch size)
    "dpo": (POLICY, True, 4),
    "grpo": (POLICY, True, GRPO_PROMPTS * GRPO_G // 2),  # micro-batches: two per optimizer step
    "grpo-bf16": (POLICY, True, GRPO_PROMPTS * GRPO_G // 2),  # alignkit samples from its bf16 copy; TRL as grpo
    "rm-minilm": (ENCODER, False, 8),
    "rm-smollm2": (POLICY, True, 8),
}


# PPO against TRL 1.12's PPOTrainer is benchmarks/ppo_vs_trl.py; these parts run it:
# (a) equal work, a separate value model on both sides, full fine-tuning or a LoRA policy;
# (b) each library's recommended set-up for a LoRA policy, with the held-out score
PPO_PARTS = {"ppo": [], "ppo-lora": ["--lora"], "ppo-recommended": ["--recommended"]}
PPO_STEPS = 4
COUNTED_STEPS = 2  # GRPO's and PPO's FLOPs per step: the mean over a counted run this long
PPO_GPU_SIZES = ["--prompts", "64", "--tokens", "128", "--minibatch", "16"]


def write_pairs(path: Path, n: int) -> None:
    from alignkit.data.synthetic import polite_vs_rude_pairs

    path.write_text("".join(json.dumps(r) + "\n" for r in polite_vs_rude_pairs(n, seed=0)))


# --------------------------------------------------------------------------- the two sides


def alignkit_config(part: str, pairs: Path, steps: int, out: Path):
    """``(recipe module, config)`` of alignkit's side of a DPO or reward-model part."""
    from alignkit.config import load_config

    model, lora, batch = SETTINGS[part]
    stage = "dpo" if part == "dpo" else "rm"
    overrides = [f"model.name={model}", f"model.lora.enabled={str(lora).lower()}", f"model.lora.r={LORA_R}",
                 f"model.lora.alpha={LORA_ALPHA}", f"data.path={pairs}", "data.eval_fraction=0",
                 f"data.max_length={MAX_LENGTH}", f"train.batch_size={batch}", "train.grad_accum=1",
                 f"train.max_steps={steps}", f"train.learning_rate={LR}", "train.save_every=0", "train.log_every=1",
                 f"run.output_dir={out}", "run.name=bench",
                 f"train.gradient_checkpointing={str(GRADIENT_CHECKPOINTING).lower()}", *GPU_SET]
    if stage == "dpo":
        from alignkit.recipes import dpo as recipe

        overrides += ["loss.type=dpo", f"loss.beta={BETA}"]
    else:
        from alignkit.recipes import rm as recipe
    cfg = load_config(recipe.Config, None, overrides)
    return recipe, cfg


def run_alignkit(part: str, pairs: Path, steps: int, out: Path) -> dict:
    from alignkit.runs import read_metrics

    model, lora, batch = SETTINGS[part]
    if part.startswith("grpo"):
        bf16_sampler = ["generation.dtype=bfloat16"] + (["generation.cache=static"] if GPU else [])
        return _alignkit_grpo(steps, out, bf16_sampler if part == "grpo-bf16" else [])
    stage = "dpo" if part == "dpo" else "rm"
    recipe, cfg = alignkit_config(part, pairs, steps, out)
    recipe.main(cfg)
    rows = read_metrics(out / "bench" / stage)
    return {"step_s": [r["time/step"] for r in rows if "time/step" in r]}


def grpo_prompts(n: int) -> list[str]:
    from alignkit.data.formats import load_prompts

    return [p.prompt for p in load_prompts("builtin:prompts", split="train", kind="red_team", limit=n)]


def _alignkit_grpo(steps: int, out: Path, extra: list[str]) -> dict:
    from alignkit.config import load_config
    from alignkit.recipes import rl
    from alignkit.runs import read_metrics

    overrides = [f"model.name={POLICY}", "model.lora.enabled=true", f"model.lora.r={LORA_R}",
                 f"model.lora.alpha={LORA_ALPHA}", f"reward.spec=rule:length:{LENGTH_TARGET}",
                 "data.prompts.path=builtin:prompts", "data.prompts.kind=red_team",
                 f"generation.max_new_tokens={GRPO_TOKENS}", f"generation.temperature={GRPO_TEMPERATURE}",
                 f"generation.batch_size={GRPO_PROMPTS * GRPO_G}", "rl.algorithm=grpo", f"rl.steps={steps}",
                 f"rl.prompts_per_step={GRPO_PROMPTS}", f"rl.samples_per_prompt={GRPO_G}",
                 f"rl.minibatch_size={GRPO_PROMPTS * GRPO_G}", "train.grad_accum=2", "rl.epochs=1",
                 f"rl.kl_coef={GRPO_BETA}", f"train.learning_rate={LR}", "train.save_every=0",
                 f"run.output_dir={out}", "run.name=bench", *GPU_SET, *extra]
    rl.main(load_config(rl.Config, None, overrides))
    rows = read_metrics(out / "bench" / "rl")
    gaps = [r["sampler/logprob_gap"] for r in rows if r.get("sampler/logprob_gap") is not None]
    return {"step_s": [r["time/step"] for r in rows if "time/step" in r][1:],
            "sampler_gap": statistics.mean(gaps) if gaps else None}


def _trl_grpo(steps: int, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from alignkit.models import resolve

    path = resolve(POLICY)
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    data = Dataset.from_list([{"prompt": m} for m in grpo_prompts(GRPO_PROMPTS * steps)])

    def length_reward(completions, **kwargs):  # as alignkit's rule:length:40
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [min(len(t.split()) / LENGTH_TARGET, 1.0) for t in texts]

    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *a, **kw):
            ends.append(time.perf_counter())

    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=SETTINGS["grpo"][2],
                      gradient_accumulation_steps=2, num_generations=GRPO_G, max_completion_length=GRPO_TOKENS,
                      temperature=GRPO_TEMPERATURE, top_k=0, top_p=1.0, beta=GRPO_BETA, num_iterations=1,
                      learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_steps=steps,
                      report_to=[], save_strategy="no", logging_steps=1, use_cpu=not GPU, bf16=GPU, fp16=False,
                      seed=0, dataloader_num_workers=0, gradient_checkpointing=GRADIENT_CHECKPOINTING,
                      disable_dropout=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=[length_reward], args=args, train_dataset=data,
                          processing_class=tok, callbacks=[StepClock()],
                          peft_config=LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    start = time.perf_counter()
    trainer.train()
    marks = [start, *ends]
    return {"step_s": [b - a for a, b in zip(marks, marks[1:])][1:]}


def run_trl(part: str, pairs: Path, steps: int, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    from alignkit.models import resolve

    if part.startswith("grpo"):
        return _trl_grpo(steps, out)
    model_name, lora, batch = SETTINGS[part]
    path = resolve(model_name)
    tok = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    # conversational records: both sides render the prompt with the model's chat template
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    peft_config = (LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear",
                              task_type="CAUSAL_LM" if part == "dpo" else "SEQ_CLS") if lora else None)
    common = dict(output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                  max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                  max_length=MAX_LENGTH, report_to=[], save_strategy="no", logging_steps=1, use_cpu=not GPU,
                  bf16=GPU, fp16=False, seed=0, dataloader_num_workers=0,
                  # as alignkit: DPO without dropout (as its RL stages), reward models with the model's own
                  disable_dropout=part == "dpo",
                  # TRL turns it on by default; the same work means the same setting on both sides
                  gradient_checkpointing=GRADIENT_CHECKPOINTING)
    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *a, **kw):
            ends.append(time.perf_counter())

    if part == "dpo":
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        trainer = DPOTrainer(model=model, args=DPOConfig(beta=BETA, **common), train_dataset=data,
                             processing_class=tok, peft_config=peft_config, callbacks=[StepClock()])
    else:
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        if tok.eos_token is None:  # BERT-style: the separator closes a sequence
            tok.eos_token = tok.sep_token
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model.config.pad_token_id = tok.pad_token_id
        if tok.chat_template is None:  # the encoder has none: plain text, prompt then answer
            data = Dataset.from_list([{"chosen": r["prompt"] + "\n" + r["chosen"],
                                       "rejected": r["prompt"] + "\n" + r["rejected"]} for r in rows])
        trainer = RewardTrainer(model=model, args=RewardConfig(**common), train_dataset=data, processing_class=tok,
                                peft_config=peft_config, callbacks=[StepClock()])
    start = time.perf_counter()
    trainer.train()
    marks = [start, *ends]
    return {"step_s": [b - a for a, b in zip(marks, marks[1:])][1:]}  # like ours: from the end of step 1


def child(side: str, part: str, pairs: Path, steps: int) -> None:
    os.environ.setdefault("ALIGNKIT_NO_PROGRESS", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from alignkit.models import quiet_transformers

    quiet_transformers()
    if side == "flops":
        result = {"flops": step_flops(part, pairs, steps) if part else 0.0, "peak": matmul_peak()}
        if part:
            result["alignkit_flops"] = alignkit_step_flops(part, pairs, steps)
    elif side.endswith("-count"):  # a GRPO side's FLOPs per step, from a counted run of COUNTED_STEPS
        run = run_alignkit if side == "alignkit-count" else run_trl
        with tempfile.TemporaryDirectory() as out:
            result = {"flops": counted_flops(lambda: run(part, pairs, COUNTED_STEPS, Path(out))) / COUNTED_STEPS}
    else:
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            result = (run_alignkit if side == "alignkit" else run_trl)(part, pairs, steps, Path(out))
            result["run_s"] = time.perf_counter() - t0
        if GPU:
            import torch

            result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def launch(side: str, part: str, pairs: Path, steps: int) -> dict:
    """Run one side (or the FLOP count) in a child process: this process stays small, so that a
    child's peak resident set, which starts from what it inherits, is its own."""
    cmd = [sys.executable, __file__, "--side", side, "--part", part, "--pairs", str(pairs), "--steps", str(steps)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{part}: {side} failed")
    result = json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    result["peak_mib"] = result.pop("peak_cuda_mib", usage.ru_maxrss / 1024)  # on a GPU, the device's
    return result


# --------------------------------------------------------------------------- utilisation


def matmul_peak(gpu: bool = GPU) -> float:
    """The machine's matmul rate in FLOP/s: the best of 2048 x 2048 fp32 products timed here (on a GPU,
    8192 x 8192 in bf16)."""
    import torch

    n, kw = (8192, dict(device="cuda", dtype=torch.bfloat16)) if gpu else (2048, {})
    a, b = torch.randn(n, n, **kw), torch.randn(n, n, **kw)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        if gpu:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / 5)
    return 2 * n ** 3 / best


def counted_flops(run) -> float:
    """The FLOPs ``run()`` executes, every forward and backward in it (sampling included), counted by torch's
    FlopCounterMode: how utilisation is measured where a step's work depends on what was sampled (PPO,
    GRPO), in a run of its own (counting slows each operation down)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def step_shape(part: str, pairs: Path, steps: int) -> tuple[int, float]:
    """``(rows, mean padded length)`` of a training step: both answers of each pair, prompt + answer cut
    at ``MAX_LENGTH`` tokens, padded to the longest row of the step."""
    from alignkit.data.collate import encode_prompt, encode_response
    from alignkit.models import load_tokenizer

    model, _, batch = SETTINGS[part]
    tok = load_tokenizer(model)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    widths = []
    for k in range(0, min(len(rows), batch * steps), batch):
        prompts = [len(encode_prompt(tok, [{"role": "user", "content": r["prompt"]}])) for r in rows[k:k + batch]]
        widths.append(max(min(MAX_LENGTH, p + len(encode_response(tok, r[side])))
                          for p, r in zip(prompts, rows[k:k + batch]) for side in ("chosen", "rejected")))
    return 2 * batch, statistics.mean(widths)


def step_flops(part: str, pairs: Path, steps: int) -> float:
    """The FLOPs of a step run the plain way, counted by torch's FlopCounterMode: the trained model's forward
    and backward over the step's rows, padded to their mean padded length, as alignkit loads it (LoRA
    included). A DPO step's reference log-probs are not counted (alignkit computes them once, TRL in
    every step), so this is TRL's trained-model work; alignkit's is :func:`alignkit_step_flops`."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from alignkit.config import LoraConfig, ModelConfig
    from alignkit.models import load_causal_lm, load_sequence_scorer, load_tokenizer

    model_name, lora, _ = SETTINGS[part]
    rows, width = step_shape(part, pairs, steps)
    cfg = ModelConfig(name=model_name, lora=LoraConfig(enabled=lora, r=LORA_R, alpha=LORA_ALPHA))
    tok = load_tokenizer(model_name)
    model = (load_causal_lm if part == "dpo" else load_sequence_scorer)(cfg, tokenizer=tok)
    ids = torch.randint(5, 1000, (rows, round(width)))
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        out.logits.float().mean().backward()
    return counter.get_total_flops()


def alignkit_step_flops(part: str, pairs: Path, steps: int) -> float:
    """The FLOPs of alignkit's DPO or reward-model step, per step, counted by FlopCounterMode over its own
    forward and backward on each step's pairs: each pair's prompt once with a causal model, and for DPO
    the LM head on answer positions only."""
    from torch.utils.flop_counter import FlopCounterMode

    from alignkit.models import load_causal_lm, load_sequence_scorer, load_tokenizer

    batch = SETTINGS[part][2]
    with tempfile.TemporaryDirectory() as out:
        recipe, cfg = alignkit_config(part, pairs, steps, Path(out))
    tok = load_tokenizer(cfg.model.name, padding_side="right")  # as the recipes load them
    if part == "dpo":
        model = load_causal_lm(cfg.model, trainable=True, rl=True, tokenizer=tok)
        examples, _ = recipe.load_examples(cfg, tok)

        def step(k: int):
            out = recipe.sequence_logps(model, examples[k:k + batch], tok.pad_token_id)
            return out.a.sum() - out.b.sum()
    else:
        from alignkit.rewards.model import RMInput

        model = load_sequence_scorer(cfg.model, tokenizer=tok)
        train, _ = recipe.load_pairs(cfg)
        data = recipe.encode_pairs(RMInput(tok, cfg.layout, cfg.data.max_length), train, "raise")

        def step(k: int):
            chosen, rejected = recipe.score_pairs(model, RMInput(tok, cfg.layout, cfg.data.max_length), data,
                                                  list(range(k, min(k + batch, len(data.chosen)))))
            return chosen.sum() - rejected.sum()
    with FlopCounterMode(display=False) as counter:
        for k in range(0, batch * steps, batch):
            step(k).backward()
    return counter.get_total_flops() / steps




# --------------------------------------------------------------------------- the table


def training_part(part: str, steps: int, tmp: Path, peak: float) -> str:
    pairs = tmp / f"{part}.jsonl"
    write_pairs(pairs, SETTINGS[part][2] * steps)  # one epoch: the reference cache covers what is trained
    # (grpo reads prompts, not pairs)
    res = {side: launch(side, part, pairs, steps) for side in ("alignkit", "trl")}
    med = {s: statistics.median(r["step_s"]) for s, r in res.items()}
    model, lora, batch = SETTINGS[part]
    if part.startswith("grpo"):  # what each side runs, sampling included (counted in runs of their own)
        flops = {side: launch(f"{side}-count", part, pairs, COUNTED_STEPS)["flops"] for side in res}
    else:  # TRL: the plain step's work; alignkit: its own step's (each prompt once with a causal model)
        counted = launch("flops", part, pairs, steps)
        flops = {"alignkit": counted.get("alignkit_flops", counted["flops"]), "trl": counted["flops"]}
    use = (f"  {flops['alignkit'] / 1e9:5.0f} vs {flops['trl'] / 1e9:5.0f} GFLOP/step, "
           f"{flops['alignkit'] / med['alignkit'] / peak:4.0%} vs {flops['trl'] / med['trl'] / peak:4.0%} of matmul peak")
    if res["alignkit"].get("sampler_gap") is not None:
        use += f"  sampler/logprob_gap {res['alignkit']['sampler_gap']:.4f}"
    name = model.removeprefix("builtin:") if model.startswith("builtin:") else Path(model).name
    return (f"{part:<11} {name:<24} {'LoRA' if lora else 'full':<5} batch {batch}  "
            f"s/step {med['alignkit']:6.3f} vs {med['trl']:6.3f}  x{med['trl'] / med['alignkit']:4.2f} faster  "
            f"run {res['alignkit']['run_s']:6.1f} vs {res['trl']['run_s']:6.1f} s  "
            f"peak {res['alignkit']['peak_mib']:6.0f} vs {res['trl']['peak_mib']:6.0f} MiB "
            f"(x{res['alignkit']['peak_mib'] / res['trl']['peak_mib']:.2f}){use}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="dpo,rm-minilm,rm-smollm2,grpo,ppo-recommended,ppo,generation",
                   help="also: ppo-lora, grpo-bf16 (alignkit samples from a bf16 copy, TRL in fp32)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per side (the first is warm-up)")
    p.add_argument("--batches", default="8,32,64", help="generation: batch sizes")
    p.add_argument("--gpu", action="store_true", help="both sides on CUDA in bf16 autocast, larger batches")
    p.add_argument("--model", help="a folder to use instead of SmolLM2 (e.g. from benchmarks/shapes.py)")
    p.add_argument("--side", choices=("alignkit", "trl", "flops", "alignkit-count", "trl-count"),
                   help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--pairs", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.side and (args.gpu != GPU or (args.model or "") != os.environ.get("COMPARE_MODEL", "")):
        # this module's settings are read from the environment at import: start again with them set there
        os.environ.update(COMPARE_GPU="1" if args.gpu else "0", COMPARE_MODEL=args.model or "")
        os.execv(sys.executable, [sys.executable, __file__, *sys.argv[1:]])
    if args.side:
        child(args.side, args.part, args.pairs, args.steps)
        return 0
    parts = args.parts.split(",")
    if any(part in SETTINGS or part in PPO_PARTS for part in parts) and importlib.util.find_spec("trl") is None:
        raise SystemExit("compare: TRL is not installed; pip install -e '.[bench]'")
    lines = []
    peak = launch("flops", "", Path(), 0)["peak"]
    with tempfile.TemporaryDirectory() as tmp:
        for part in parts:
            if part in SETTINGS:
                print(f"running {part} ...", flush=True)
                try:
                    lines.append(training_part(part, args.steps, Path(tmp), peak))
                except RuntimeError as e:
                    lines.append(f"{part:<11} FAILED: {e}")
                print(lines[-1], flush=True)
            elif part in PPO_PARTS:
                print(f"running {part} ...", flush=True)
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
                done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ppo_vs_trl.py"), "--steps",
                                       str(PPO_STEPS), "--model", POLICY, *PPO_PARTS[part],
                                       *(["--gpu", *PPO_GPU_SIZES] if GPU else [])],
                                      env=env, capture_output=True, text=True)
                table = done.stdout[done.stdout.find("\nPPO on"):].strip() if done.returncode == 0 else ""
                lines.append(f"{part}:\n{table}" if table else f"{part:<11} FAILED: {done.stderr.strip()[-300:]}")
                print(lines[-1], flush=True)
            elif part == "generation":
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
                done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generation.py"), "--smollm2-shape",
                                       "--batches", args.batches, "--new-tokens", "128" if GPU else "64", "--dtypes",
                                       "float32,bfloat16", "--caches", "dynamic,static" if GPU else "dynamic",
                                       "--repeats", "2"],
                                      env=env, capture_output=True, text=True)
                lines.append("generation (alignkit sampler vs plain generate):\n" + done.stdout.strip())
            else:
                raise SystemExit(f"compare: unknown part {part!r}")
    where = "CUDA, bf16 autocast" if GPU else f"fp32, {os.cpu_count()} CPUs"
    print(f"\nalignkit vs TRL on {POLICY.removeprefix('builtin:')}, {where}, {args.steps} steps per side; "
          f"load average {os.getloadavg()[0]:.1f}; {'bf16' if GPU else 'fp32'} matmul peak {peak / 1e9:.0f} GFLOP/s")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
