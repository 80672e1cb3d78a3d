"""Seconds per PPO step, by phase, and peak memory, for a PPO config on this machine.

    .venv/bin/python benchmarks/ppo_step.py                                   # tiny model, 5 steps
    .venv/bin/python benchmarks/ppo_step.py --config configs/ppo.yaml --steps 3 --threads 2
    .venv/bin/python benchmarks/ppo_step.py --config configs/ppo.yaml --steps 3 model.lora.enabled=false

Runs ``alignkit ppo`` in a temporary folder and prints, per step, the rollout
(sampling + policy/reference/value forwards), score and update seconds, the
sampled tokens per second, the process's CPU seconds and peak resident memory,
and the score and KL at the first and last step. The first step includes
warm-up; the summary gives the median of the others. Extra ``key=value``
arguments override the config.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "ppo-tiny.yaml"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args()

    os.environ.setdefault("ALIGNKIT_NO_PROGRESS", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from alignkit.config import load_config
    from alignkit.recipes import ppo
    from alignkit.runs import read_metrics

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(ppo.Config, args.config, [*args.overrides, f"ppo.steps={args.steps}", "train.save_every=0",
                                                    "train.log_every=1", f"run.output_dir={out}"])
        wall0, cpu0 = time.time(), time.process_time()
        ppo.main(cfg)
        wall, cpu = time.time() - wall0, time.process_time() - cpu0
        rows = read_metrics(Path(out) / cfg.run.name / "ppo")

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n{cfg.model.name} (LoRA {'on' if cfg.model.lora.enabled else 'off'}), reward {cfg.reward.spec}, "
          f"{cfg.ppo.rollout_batch_size * cfg.ppo.samples_per_prompt} sequences x <= {cfg.generation.max_new_tokens} "
          f"tokens, {cfg.ppo.ppo_epochs} PPO epochs, minibatch {cfg.ppo.minibatch_size}; torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'step':>4} {'rollout s':>10} {'score s':>8} {'update s':>9} {'tokens/s':>9} {'score':>7} {'kl':>7}")
    for r in rows:
        print(f"{r['step']:>4} {r['time/rollout']:>10.2f} {r['time/score']:>8.3f} {r['time/update']:>9.2f} "
              f"{r['tokens_per_s']:>9.1f} {r['score/mean']:>7.3f} {r['kl']:>7.3f}")
    later = rows[1:] or rows
    per_step = [r["time/rollout"] + r["time/score"] + r["time/update"] for r in later]
    print(f"median s/step (steps 2+): {statistics.median(per_step):.2f}; whole run {wall:.1f} s wall, "
          f"{cpu:.1f} s CPU (model loading included); peak RSS {peak:.0f} MiB")
    print(f"score {rows[0]['score/mean']:.3f} -> {rows[-1]['score/mean']:.3f}, "
          f"KL {rows[0]['kl']:.3f} -> {rows[-1]['kl']:.3f} nats/sequence")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
