"""How fast DPO learns the synthetic polite-vs-rude preference on a tiny model, on the CPU.

    .venv/bin/python benchmarks/dpo_accuracy.py                 # 2,000 pairs, 200 held out, one epoch
    .venv/bin/python benchmarks/dpo_accuracy.py --pairs 1500 --epochs 2 --threads 1

Trains ``tiny:llama`` (2 layers x 64, random init) with ``alignkit dpo`` and prints the
held-out implicit-reward accuracy (share of held-out pairs with beta * log(pi/ref) of
the chosen answer above the rejected one) at each evaluation, the wall time at which
it first reached the target (default 0.9), and the whole run's wall and CPU seconds,
the reference pass and model loading included. The issue's bar: >= 0.9 in < 2 minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=2000, help="synthetic pairs in all (10%% held out)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--loss", default="dpo", choices=("dpo", "ipo", "simpo", "kto"))
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()

    os.environ.setdefault("ALIGNKIT_NO_PROGRESS", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from alignkit.config import load_config
    from alignkit.recipes import dpo
    from alignkit.runs import read_metrics

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(dpo.Config, ROOT / "configs" / "dpo-tiny.yaml", [
            f"data.path=synthetic:polite_vs_rude?n={args.pairs}&seed={args.seed}", "data.eval_fraction=0.1",
            f"loss.type={args.loss}", "train.max_steps=null", f"train.epochs={args.epochs}",
            f"train.eval_every={args.eval_every}", "train.save_every=0", f"run.output_dir={out}",
        ] + (["loss.average_logprobs=true", "loss.beta=0.5"] if args.loss == "ipo" else []))
        wall0, cpu0 = time.time(), time.process_time()
        dpo.main(cfg)
        wall, cpu = time.time() - wall0, time.process_time() - cpu0
        run = Path(out) / cfg.run.name / "dpo"
        rows = [r for r in read_metrics(run) if "eval_loss" in r]

    key = "eval_reward_accuracy" if args.loss != "kto" else "eval_loss"
    print(f"\ntiny:llama 2x64, {args.loss}, {args.pairs} pairs ({args.pairs - round(args.pairs * 0.1)} train), "
          f"batch {cfg.train.batch_size}, lr {cfg.train.learning_rate}, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'step':>6} {'train s':>8} {key:>22}")
    for r in rows:
        print(f"{r['step']:>6} {r['seconds']:>8.1f} {r[key]:>22.3f}")
    # Everything before the first step (loading, tokenising, the reference pass) and the
    # final save: the run's wall time minus the training clock of its last row.
    setup = wall - rows[-1]["seconds"]
    first = next((r for r in rows if args.loss != "kto" and r[key] >= args.target), None)
    to_target = setup + first["seconds"] if first else float("inf")
    reached = (f"step {first['step']}, {to_target:.1f} s wall from the start "
               f"({setup:.1f} s setup + {first['seconds']:.1f} s training)") if first else "never"
    print(f"first evaluation at >= {args.target}: {reached}; final {key} {rows[-1][key]:.3f}")
    print(f"whole run: {wall:.1f} s wall, {cpu:.1f} s CPU (loading, reference pass, training, evaluation)")
    ok = to_target < 120
    print("PASS" if ok else "FAIL", f"(>= {args.target} held-out reward accuracy within 120 s of wall time)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
