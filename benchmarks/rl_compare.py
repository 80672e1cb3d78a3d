"""PPO against the critic-free optimisers (GRPO, RLOO, online DPO) on the demo's objective, side by side.

    .venv/bin/python benchmarks/rl_compare.py                 # ~40 minutes on 2 CPU cores
    .venv/bin/python benchmarks/rl_compare.py --steps 6       # a quicker look

The demo's AI labels and its safety reward model (a MiniLM reward model learning the
labels of the built-in model's answers to the red-team training prompts), then each
optimiser against that reward model with the same budget: 16 sampled answers per step (PPO 16 prompts x 1, GRPO and
RLOO 4 x 4, online DPO 8 x 2) for the same number of steps, the same LoRA, learning rate,
temperature, answer length, KL weight (0.1) and 2 passes over each rollout. Then one
evaluation of all of them on the held-out prompts, scored by the classifier the labels came
from (which no optimiser saw directly). Printed: held-out toxicity and its paired change
against the start model (95% interval), KL to the start model, distinct-2, seconds per
step (median from step 2 on) and peak memory of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL = "builtin:smollm2-135m-instruct"
LORA = {"enabled": True, "r": 16, "alpha": 32}
PROMPTS = {"path": "builtin:prompts", "split": "train", "kind": "red_team", "max_prompt_length": 128}
GENERATION = {"max_new_tokens": 40, "temperature": 0.7, "batch_size": 16}


def method_configs(steps: int, rm: str) -> dict[str, tuple[str, dict]]:
    """Each optimiser's stage and config, with the same budget."""
    reward = {"spec": f"rm:{rm}?normalize=true"}
    train = {"learning_rate": 2.5e-4, "save_every": 0}
    common = {"model": {"name": MODEL, "lora": LORA}, "reward": reward, "data": {"prompts": PROMPTS},
              "generation": GENERATION, "train": train}

    def rl(algorithm: str, prompts: int, samples: int) -> tuple[str, dict]:
        return "rl", {**common, "rl": {"algorithm": algorithm, "steps": steps, "prompts_per_step": prompts,
                                       "samples_per_prompt": samples, "minibatch_size": 8, "epochs": 2,
                                       "kl_coef": 0.1, "dpo_beta": 0.1}}

    return {
        "ppo": ("ppo", {**common, "value": {"mode": "shared", "learning_rate": 2e-3},
                        "ppo": {"steps": steps, "rollout_batch_size": 16, "minibatch_size": 8, "ppo_epochs": 2,
                                "kl": {"coef": 0.1}}}),
        "grpo": rl("grpo", 4, 4),
        "rloo": rl("rloo", 4, 4),
        "online-dpo": rl("online_dpo", 8, 2),
    }


def eval_config(folders: dict[str, Path], rm: str, out: str) -> dict:
    return {"models": [{"name": "start", "path": MODEL}] + [{"name": m, "path": str(f)} for m, f in folders.items()],
            "baseline": "start", "reference": "start",
            "prompts": {"path": "builtin:prompts", "split": "test"},
            "generation": {"max_new_tokens": 40, "temperature": 0.7, "batch_size": 80},
            "samples_per_prompt": 4, "toxicity": {"scorer": "profanity", "invert": True},
            "reward_model": f"rm:{rm}", "report_samples": 8,
            "run": {"name": "rl-compare", "output_dir": out}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=18, help="optimiser steps (the demo's PPO runs 18)")
    p.add_argument("--out", default="runs", help="where the runs go (runs/rl-compare/...)")
    args = p.parse_args()
    os.environ.setdefault("ALIGNKIT_NO_PROGRESS", "1")
    from alignkit.recipes.pipeline import run_pipeline
    from alignkit.runs import read_metrics

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # 1. the demo's labels and its safety reward model (a rerun skips them)
    demo = yaml.safe_load((ROOT / "src" / "alignkit" / "pipelines" / "demo.yaml").read_text())
    stages = [s for s in demo["stages"] if s["name"] in ("label", "rm-safety")]
    spec = out / "rl-compare-labels.yaml"
    spec.write_text(yaml.safe_dump({"name": "rl-compare", "output_dir": str(out), "stages": stages}))
    rm = str(run_pipeline(spec)["rm-safety"] / "final")
    # 2. each optimiser in a process of its own (its peak memory is its own), 3. one evaluation
    folders = {}
    for name, (stage, config) in method_configs(args.steps, rm).items():
        path = out / f"rl-compare-{name}.yaml"
        path.write_text(yaml.safe_dump({**config, "run": {"name": f"rl-compare/{name}", "output_dir": str(out)}}))
        subprocess.run([sys.executable, "-m", "alignkit.cli", stage, "--config", str(path), "--resume"], check=True)
        folders[name] = out / "rl-compare" / name / stage
    path = out / "rl-compare-eval.yaml"
    path.write_text(yaml.safe_dump(eval_config(folders, rm, str(out))))
    subprocess.run([sys.executable, "-m", "alignkit.cli", "eval", "--config", str(path)], check=True)
    report = out / "rl-compare" / "eval" / "final"
    metrics = json.loads((report / "metrics.json").read_text())
    by_name = {m["name"]: m["metrics"] for m in metrics["models"]}

    def fmt(metric, digits=3):
        if not metric or metric.get("value") is None:
            return "-"
        low, high = metric.get("low"), metric.get("high")
        interval = f" [{low:.{digits}f}, {high:.{digits}f}]" if low is not None and high is not None else ""
        return f"{metric['value']:.{digits}f}{interval}"

    print(f"\n{'method':<11} {'toxicity':<22} {'change vs start (paired)':<28} {'KL':<22} {'distinct-2':<10} "
          f"{'s/step':>7} {'peak MiB':>9}")
    for name in ("start", *folders):
        m = by_name[name]
        s_step = peak = "-"
        if name != "start":
            rows = read_metrics(folders[name])
            later = rows[1:] or rows
            s_step = f"{statistics.median(r['time/rollout'] + r['time/score'] + r['time/update'] for r in later):.1f}"
            peak = f"{max(r.get('memory/peak_rss_mb') or 0 for r in rows):.0f}"
        print(f"{name:<11} {fmt(m.get('toxicity_mean')):<22} {fmt(m.get('toxicity_change_vs_baseline')):<28} "
              f"{fmt(m.get('kl_to_reference')):<22} {fmt(m.get('distinct_2')):<10} {s_step:>7} {peak:>9}")
    print(f"\nload average {os.getloadavg()[0]:.1f}; report: {report / 'report.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
