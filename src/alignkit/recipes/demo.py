"""The built-in demo: the whole loop on the built-in model, offline.

    alignkit demo            # ~30 minutes on 2 CPU cores
    alignkit demo --quick    # fewer prompts and steps: ~10 minutes

Runs ``alignkit/pipelines/demo.yaml`` (AI labels -> reward model -> PPO and DPO ->
evaluation) into ``runs/demo/`` (``runs/demo-quick/`` with ``--quick``); a rerun
skips the stages already done. The last lines printed are the evaluation's summary
table and the report's path.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

from alignkit.recipes.chat import chat
from alignkit.recipes.pipeline import run_pipeline

DEMO_PROMPT = "In two sentences, what is reinforcement learning from human feedback?"

# --quick: a smaller version of every stage, same shape.
QUICK = [
    "stages.label.data.limit=48",
    "stages.rm.train.epochs=2",
    "stages.ppo.ppo.steps=6",
    "stages.ppo.ppo.rollout_batch_size=12",
    "stages.dpo.data.limit=48",
    "stages.eval.samples_per_prompt=2",
    "stages.eval.report_samples=6",
]


def demo_pipeline() -> Path:
    return Path(str(resources.files("alignkit.pipelines").joinpath("demo.yaml")))


def cli(argv: list[str], stage: str = "demo") -> int:
    p = argparse.ArgumentParser(prog="alignkit demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a ~10-minute version")
    p.add_argument("--output-dir", default="runs", help="where runs/NAME/STAGE folders go")
    p.add_argument("--from", dest="start_from", default=None, help="rerun from this stage on")
    p.add_argument("--chat-only", action="store_true", help="only answer one prompt with the built-in model")
    p.add_argument("overrides", nargs="*", metavar="stages.NAME.key=value")
    args = p.parse_args(argv)
    # First, the model as it starts: one chat reply (also a quick check that it loads).
    chat(["--greedy", "--max-new-tokens", "96", DEMO_PROMPT])
    if args.chat_only:
        return 0
    overrides = (QUICK if args.quick else []) + list(args.overrides)
    name = "demo-quick" if args.quick else "demo"
    folders = run_pipeline(demo_pipeline(), overrides, args.start_from,
                           rename={"name": name, "output_dir": args.output_dir})
    final = folders["eval"] / "final"
    from alignkit.eval.report import render_summary_table

    metrics = final / "metrics.json"
    if metrics.exists():  # printed again so that it stays last, also when eval was skipped
        print(render_summary_table(json.loads(metrics.read_text())))
    print(f"report: {final / 'report.html'}")
    return 0
