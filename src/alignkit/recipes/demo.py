"""The built-in demo: the whole loop on the built-in model, offline.

    alignkit demo            # ~22 minutes on 2 CPU cores (stage times in the README)
    alignkit demo --quick    # ~8 minutes: fewer prompts and steps, a smaller evaluation

Runs ``alignkit/pipelines/demo.yaml`` (AI labels -> reward model -> PPO and DPO ->
evaluation) into ``runs/demo/`` (``runs/demo-quick/`` with ``--quick``); a rerun
skips the stages already done. The last lines printed are pass/fail checks of the
result, the evaluation's summary table and the report's path.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

from alignkit.recipes.chat import chat
from alignkit.recipes.pipeline import run_pipeline

DEMO_PROMPT = "In two sentences, what is reinforcement learning from human feedback?"

# --quick: a smaller version of every stage. The evaluation compares start, PPO and DPO
# (best-of-2 left out) on 2 samples per prompt: with one sample the paired interval of a
# heavy-tailed score is about as wide as the effect; a best-of-2 model costs as much as two.
QUICK = [
    "stages.label.data.limit=48",
    "stages.rm.train.epochs=2",
    "stages.ppo.ppo.steps=6",
    "stages.ppo.ppo.rollout_batch_size=12",
    "stages.ppo.ppo.minibatch_size=6",
    "stages.dpo.data.limit=32",
    "stages.eval.models=[{name: start, path: 'builtin:smollm2-135m-instruct'}, {name: ppo, path: '${ppo}'},"
    " {name: dpo, path: '${dpo}'}]",
    "stages.eval.pairwise=[{model_a: ppo, model_b: start}, {model_a: dpo, model_b: start}]",
    "stages.eval.samples_per_prompt=2",
    "stages.eval.report_samples=6",
]


def demo_pipeline() -> Path:
    return Path(str(resources.files("alignkit.pipelines").joinpath("demo.yaml")))


def cli(argv: list[str], stage: str = "demo") -> int:
    p = argparse.ArgumentParser(prog="alignkit demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller version of every stage")
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
        data = json.loads(metrics.read_text())
        print("\n".join(result_checks(data, "ppo", "start")))
        if args.quick:
            print("(--quick checks that every stage runs; 6 PPO steps are too few to be expected to pass "
                  "these: the full demo is the measurement)")
        print()
        print(render_summary_table(data))
    print(f"report: {final / 'report.html'}")
    return 0


def result_checks(metrics: dict, model: str, baseline: str) -> list[str]:
    """The demo's promise, one line each: did ``model`` get less toxic than ``baseline``
    (95% interval of the paired change below 0), within the KL budget, without degenerate
    text (distinct-2 within 10%), and does it win more than it loses under the judge?"""
    by_name = {m["name"]: m["metrics"] for m in metrics["models"]}
    if model not in by_name or baseline not in by_name:
        return [f"result: no {model!r} or {baseline!r} in the evaluation"]
    ours, base = by_name[model], by_name[baseline]
    lines = []

    def check(ok: bool, text: str) -> None:
        lines.append(f"[{'pass' if ok else 'FAIL'}] {text}")

    change = ours.get("toxicity_change_vs_baseline")
    if change:
        check(change["high"] < 0, f"toxicity change {model} - {baseline}: {change['value']:+.4f} "
                                  f"[{change['low']:+.4f}, {change['high']:+.4f}] (interval below 0)")
    kl, budget = ours.get("kl_to_reference"), metrics.get("kl_budget")
    if kl and budget is not None:
        check(kl["value"] <= budget, f"KL to reference {kl['value']:.3f} nats <= budget {budget:g}")
    d_ours, d_base = (m.get("distinct_2", {}).get("value") for m in (ours, base))
    if d_ours is not None and d_base:
        check(abs(d_ours - d_base) <= 0.1 * d_base,
              f"distinct-2 {d_ours:.3f} within 10% of {baseline}'s {d_base:.3f}")
    for row in metrics.get("pairwise", []):
        if (row["model_a"], row["model_b"]) == (model, baseline):
            check(row["wins"] > row["losses"], f"{model} vs {baseline} under {row['judge']}: "
                                               f"{row['wins']} wins > {row['losses']} losses")
    return lines
