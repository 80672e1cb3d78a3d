"""What every online optimiser shares: PPO, and the critic-free GRPO, RLOO, REINFORCE++ and online DPO.

The prompt set (checked against the limits before anything samples), the prompts
of a step (a pure function of seed and step, so a resumed run continues exactly),
scoring a rollout (each process its share), the metrics of an update across
processes, the run's memory and its score and KL curves.
"""

from __future__ import annotations

import json
import sys

import torch

from alignkit.config import DataConfig
from alignkit.data.collate import encode_prompts
from alignkit.data.formats import load_prompts
from alignkit.errors import AlignkitError, NonFiniteError
from alignkit.rewards.combine import call_reward
from alignkit.rollout import Rollout
from alignkit.runs import RunDir, read_metrics
from alignkit.training import SingleProcess, epoch_order


def load_prompt_set(d: DataConfig, tok, context: int | None = None,
                    max_new_tokens: int = 0) -> tuple[list, list[list[int]]]:
    """The prompts and their token ids; a prompt over ``max_prompt_length`` (or, with up to
    ``max_new_tokens`` after it, over the model's context) is an error, or skipped with on_error=skip."""
    if not d.path:
        raise AlignkitError("data.prompts.path is empty: give a prompt file (data.prompts.path=prompts.jsonl) "
                            "or builtin:prompts")
    examples = load_prompts(d.path, d.split, d.on_error, kind=d.kind, limit=d.limit, fmt=d.format,
                            setting="data.prompts.format")
    kept, ids = encode_prompts(tok, examples, d.max_prompt_length, d.on_error,
                               setting="data.prompts.max_prompt_length", context=context,
                               max_new_tokens=max_new_tokens)
    if not kept:
        raise AlignkitError(f"{d.path}: no prompts to train on (split={d.split}, kind={d.kind})")
    return kept, ids


def online_unused(prompts: str, who: str) -> dict[str, str]:
    """The shared settings an online optimiser (ppo, rl) does not read, for
    :func:`~alignkit.config.reject_unused`: it samples from prompts and holds none out."""
    return {f"{prompts}.eval_fraction": f"{who}: it holds no prompts out (alignkit eval compares models)",
            f"{prompts}.eval_path": f"{who}: it holds no prompts out (alignkit eval compares models)",
            f"{prompts}.max_length": f"{who}: {prompts}.max_prompt_length bounds a prompt and "
                                     f"generation.max_new_tokens its answer",
            "train.eval_every": f"{who}: it has no held-out evaluation (alignkit eval compares models)"}


def prompt_batch(n_prompts: int, batch: int, seed: int, step: int) -> list[int]:
    """Prompt indices of iteration ``step`` (1-based): a reshuffled pass over the set per epoch.

    A pure function of (seed, step), so the data position of a resumed run is its step.
    """
    start = (step - 1) * batch
    out = []
    for k in range(start, start + batch):
        epoch, i = divmod(k, n_prompts)
        out.append(epoch_order(n_prompts, seed, epoch)[i])
    return out


def score_rollout(reward_fn, prompts: list, rollout: Rollout, no_eos_penalty: float | None,
                  engine=None, kinds: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, raw_scores)``, ``(N,)``: the reward, with the no-EOS penalty applied to unfinished responses.

    ``kinds[j]`` is prompt j's tag (``red_team``, ``helpful``), passed to rewards that route
    on it (the gated reward). With an engine, each process scores its contiguous share of
    the rows and every process gets all scores. The penalty replaces the score; the response itself is
    left as sampled (writing EOS over its last token would train on an action the
    policy never took).
    """
    engine = engine or SingleProcess()
    rows = engine.shard(list(range(len(rollout))))
    with engine.together():
        which = [int(rollout.prompt_index[i]) for i in rows]
        mine = call_reward(reward_fn, [prompts[j] for j in which], [rollout.texts[i] for i in rows],
                           None if kinds is None else [kinds[j] for j in which])
        mine = [float(x) for x in mine]
    raw = torch.tensor(engine.gather(mine), dtype=torch.float32)
    bad = torch.nonzero(~torch.isfinite(raw)).flatten()
    if len(bad):
        raise NonFiniteError(f"reward '{reward_fn.name}' gave a non-finite score to response {int(bad[0])}")
    scores = raw
    if no_eos_penalty is not None:
        scores = torch.where(rollout.finished, raw, torch.full_like(raw, no_eos_penalty))
    return scores, raw


def rollout_samples(prompts: list, kinds: list, rollout: Rollout, scores: torch.Tensor) -> list[dict]:
    """The rollout as rows for samples.jsonl: prompt (last turn), kind when tagged, response, score."""
    rows = []
    for i, text, score in zip(rollout.prompt_index.tolist(), rollout.texts, scores.tolist()):
        row = {"prompt": prompts[int(i)][-1]["content"]}
        if kinds[int(i)] is not None:
            row["kind"] = kinds[int(i)]
        rows.append({**row, "response": text, "score": score})
    return rows


def kind_scores(kinds: list, rollout: Rollout, scores: torch.Tensor) -> dict[str, float]:
    """``score/KIND``: the mean score of each prompt kind in the rollout (two-sided runs watch both)."""
    per_row = [kinds[int(i)] for i in rollout.prompt_index.tolist()]
    out = {}
    for kind in sorted({k for k in per_row if k is not None}):
        picked = torch.tensor([k == kind for k in per_row])
        out[f"score/{kind}"] = scores[picked].mean().item()
    return out


def run_steps(engine, run: RunDir, first: int, steps: int, step_fn, train_cfg, label: str,
              checkpoint_extra=None) -> dict:
    """The online loop PPO and the critic-free optimisers share: ``step_fn(step) -> (metrics, records)``
    for steps ``first .. steps``, logging, checkpointing (``checkpoint_extra()``: more state to save)
    and a progress bar; a non-finite score or loss stops with the step named, the last checkpoint kept.
    Returns the last step's metrics."""
    bar, task = engine.progress(steps, label)
    last: dict = {}
    step = first
    try:
        with bar:
            bar.update(task, completed=first - 1)
            for step in range(first, steps + 1):
                last, _ = step_fn(step)
                if step % train_cfg.log_every == 0 or step == steps:
                    engine.log(step, {k: v for k, v in last.items() if not k.startswith("_")})
                if (train_cfg.save_every and step % train_cfg.save_every == 0) or step == steps:
                    engine.save_checkpoint(run, step, train_cfg, extra=checkpoint_extra() if checkpoint_extra else None)
                bar.update(task, advance=1, info=f"score {last['score/mean']:.3f} kl {last['kl']:.3f}")
    except AlignkitError as e:
        raise engine.stopped(run, step, e) from None
    finally:
        engine.close_log()
    return last


def finish_run(engine, run: RunDir, steps: int, last: dict) -> dict:
    """After the final save: the last rollout's samples.jsonl, the curves, DONE; returns the summary."""
    summary = {"steps": steps, **{k: v for k, v in last.items() if not k.startswith("_")}}
    if engine.is_main:
        if last.get("_samples"):
            (run.path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in last["_samples"]))
        plot_curves(run)
    engine.finish(run, summary)
    return summary


def mean_metrics(records: list[dict[str, float]], engine=None) -> dict[str, float]:
    """Token-weighted means of an update's per-micro-batch metrics over every process
    (``ratio_max``: the max; ``grad_norm``: the mean over optimizer steps)."""
    engine = engine or SingleProcess()
    keys = sorted({k for r in records for k in r} - {"tokens", "grad_norm", "ratio_max"})
    sums = {k: sum(r[k] * r["tokens"] for r in records if k in r) for k in keys}
    sums["tokens"] = sum(r["tokens"] for r in records)
    sums = engine.reduce_sum(sums)
    total = sums.pop("tokens") or 1.0
    out = {k: v / total for k, v in sums.items()}
    if any("ratio_max" in r for r in records):
        out["ratio_max"] = engine.reduce_max(max(r["ratio_max"] for r in records if "ratio_max" in r))
    norms = [r["grad_norm"] for r in records if "grad_norm" in r]
    out["grad_norm"] = sum(norms) / len(norms) if norms else None  # the same on every process
    return out


def peak_rss_mb() -> float | None:
    """The process's peak resident memory so far (Linux/macOS), in MiB."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def memory_metrics() -> dict[str, float]:
    out = {"memory/peak_rss_mb": peak_rss_mb()}
    if torch.cuda.is_available():
        out["memory/peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def plot_curves(run: RunDir) -> None:
    """Score and KL over steps, as curves.png in the run folder."""
    rows = read_metrics(run.path)
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    panels = (("score/mean", "score (mean)"), ("kl", "KL to reference (nats / sequence)"))
    for ax, (key, label) in zip(axes, panels):
        ax.plot(steps, [r.get(key) for r in rows], marker="o", markersize=2)
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run.path / "curves.png", dpi=110)
    plt.close(fig)
