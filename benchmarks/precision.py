"""Every training recipe in fp32 and in bf16 mixed precision, side by side, on this machine's device.

    .venv/bin/python benchmarks/precision.py                                  # tiny model, CPU: a smoke run
    python benchmarks/precision.py --model tiny:llama-30x576 --steps 8        # SmolLM2-135M's depth and width (GPU)
    python benchmarks/precision.py --recipes sft,dpo --precisions no,bf16,fp16

Runs ``alignkit sft | rm | dpo | ppo | rl`` (GRPO) from the shipped tiny configs with
the model swapped in, each in its own child process so that peak memory is its own,
once per precision (``train.mixed_precision``), and prints per recipe and precision:
seconds per step (median over the steps after the first, which pays for warm-up),
work per second (response tokens for sft, pairs for rm and dpo, sampled tokens for
ppo and rl), peak memory (the device's allocator on a GPU, resident memory on a
CPU) and the loss of the first three steps, so that the two precisions can be read
against each other: bf16 autocast should follow the fp32 curve to bf16 rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# stage, config, overrides that make a step a real step on a 135M-sized model
RECIPES = {
    "sft": ("sft", "sft-tiny.yaml", ["data.path=synthetic:polite_vs_rude?n=1024&seed=0", "data.eval_fraction=0",
                                     "train.batch_size=16", "train.grad_accum=1", "train.learning_rate=1e-4"]),
    "rm": ("rm", "rm-tiny.yaml", ["data.path=synthetic:polite_vs_rude?n=1024&seed=0", "data.eval_fraction=0",
                                  "train.batch_size=16", "train.learning_rate=1e-4"]),
    "dpo": ("dpo", "dpo-tiny.yaml", ["data.path=synthetic:polite_vs_rude?n=1024&seed=0", "data.eval_fraction=0",
                                     "train.batch_size=16", "train.learning_rate=1e-5"]),
    "ppo": ("ppo", "ppo-tiny.yaml", ["generation.max_new_tokens=64", "generation.batch_size=64",
                                     "ppo.rollout_batch_size=64", "ppo.minibatch_size=16", "ppo.ppo_epochs=2",
                                     "train.learning_rate=1e-5"]),
    "rl": ("rl", "rl-grpo-tiny.yaml", ["generation.max_new_tokens=64", "generation.batch_size=64",
                                       "rl.prompts_per_step=16", "rl.samples_per_prompt=4", "rl.minibatch_size=16",
                                       "rl.epochs=2", "train.learning_rate=1e-5"]),
}
STEP_KEY = {"ppo": "ppo.steps", "rl": "rl.steps"}
WORK = {"sft": ("tokens", "response tok/s"), "rm": ("pairs", "pairs/s"), "dpo": ("pairs", "pairs/s"),
        "ppo": (None, "sampled tok/s"), "rl": (None, "sampled tok/s")}
LOSS = {"sft": "loss", "rm": "loss", "dpo": "loss", "ppo": "policy_loss", "rl": "policy_loss"}


def child(out: str, stage: str, args: list[str]) -> int:
    """Run one stage in this process and record its peak memory beside the run."""
    import resource

    import torch

    from alignkit import cli

    rc = cli.main([stage, *args])
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
        where = f"cuda ({torch.cuda.get_device_name()})"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        where = "cpu (peak RSS)"
    Path(out).write_text(json.dumps({"peak_mib": peak, "device": where}))
    return rc


def run_one(recipe: str, precision: str, model: str, steps: int, work: Path, extra: list[str]) -> dict:
    stage, config, overrides = RECIPES[recipe]
    steps_key = STEP_KEY.get(recipe, "train.max_steps")
    folder = work / f"{recipe}-{precision}"
    args = ["--config", str(ROOT / "configs" / config), *overrides, f"model.name={model}", f"{steps_key}={steps}",
            f"train.mixed_precision={precision}", "train.save_every=0", "train.log_every=1",
            f"run.output_dir={folder}", *extra]
    info = folder / "peak.json"
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ALIGNKIT_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, "--child", str(info), stage, *args], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    rows = [json.loads(line) for line in (folder / "tiny" / stage / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step" in r or LOSS[recipe] in r]
    times = [r["time/step"] for r in rows if "time/step" in r][1:] or [r["time/step"] for r in rows
                                                                     if "time/step" in r]
    key, _ = WORK[recipe]
    if key is None:
        rates = [r["tokens_per_s"] for r in rows[1:] if "tokens_per_s" in r]
        rate = statistics.median(rates) if rates else float("nan")
    else:
        per_step = statistics.median(r[key] for r in rows if key in r)
        rate = per_step / statistics.median(times) if times else float("nan")
    return {"s_step": statistics.median(times) if times else float("nan"), "rate": rate,
            "losses": [r.get(LOSS[recipe]) for r in rows[:3]], **json.loads(info.read_text())}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[3], sys.argv[4:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny:llama")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--precisions", default="no,bf16")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="added to every run")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes.split(","):
            for precision in args.precisions.split(","):
                r = run_one(recipe, precision, args.model, args.steps, Path(tmp), args.overrides)
                results[f"{recipe}/{precision}"] = r
                if "error" in r:
                    print(f"{recipe:<4} {precision:<5} FAILED: {r['error']}", flush=True)
                    continue
                losses = ", ".join("-" if x is None else f"{x:.4f}" for x in r["losses"])
                print(f"{recipe:<4} {precision:<5} {r['s_step']:8.3f} s/step  {r['rate']:10.1f} "
                      f"{WORK[recipe][1]:<15} peak {r['peak_mib']:8.0f} MiB  first losses {losses}  "
                      f"[{r['device']}]", flush=True)
    print(f"model {args.model}, {args.steps} steps per run, load average {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
