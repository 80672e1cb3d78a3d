"""Rejection sampling (best-of-N fine-tuning, Llama 2 sec. 3.2.3): sample N, keep the best, fine-tune, repeat.

    alignkit best-of-n --config configs/best-of-n.yaml                 # SmolLM2-135M + LoRA, profanity reward
    alignkit best-of-n --config configs/best-of-n.yaml sampling.n=4 sampling.rounds=2 reward.spec=rule:length
    alignkit best-of-n --config configs/best-of-n.yaml --resume

Each round, from the newest model:

1. sample ``sampling.n`` responses per prompt (:func:`alignkit.rollout.generate`);
2. score them with the reward (``reward.spec``: any spec PPO takes: profanity,
   rule:..., rm:PATH, classifier:..., judge:..., python:mod:fn, or a mapping);
3. keep the best ``sampling.keep`` of each prompt and write them as an SFT data
   set with their scores: ``round-R/dataset.jsonl``, one line per kept response
   ``{"prompt", "completion", "score", "scores" (all N of its prompt), "rank", "round",
   "finished"}``;
4. fine-tune the model in memory on that set with :func:`alignkit.recipes.sft.train_sft`
   (the loop of ``alignkit sft``; its run folder is ``round-R/sft``).

Per round, ``metrics.jsonl`` (step = round) holds ``mean_best_score`` (the mean over
prompts of the best of N: what best-of-N buys at inference time) against
``mean_single_score`` (the mean over all samples: the expected score of one sample).
With ``sampling.final_sample`` the final model is sampled once more (step = rounds
+ 1): its ``mean_single_score`` against round 1's is what the fine-tuning bought.
Samples cut off at ``generation.max_new_tokens`` are kept like any other (see
``finished`` in the data set); the SFT loop ends every completion with EOS.

Run folder ``runs/NAME/best-of-n/``: config.yaml, metrics.jsonl, round-R/{dataset.jsonl,
summary.json, sft/}, final -> round-R/sft/final (the newest model), DONE.
``--resume`` skips finished rounds, reuses a round's samples once written, and
resumes its fine-tuning from the last checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alignkit.config import DataConfig, GenerationConfig, ModelConfig, RunConfig, TrainConfig, opt, to_dict
from alignkit.data.formats import PromptExample, SFTExample, load_prompts
from alignkit.errors import AlignkitError, ConfigError
from alignkit.data.collate import encode_prompts
from alignkit.models import is_peft, load_causal_lm, load_tokenizer, model_context
from alignkit.rewards import build_reward
from alignkit.rewards.combine import call_reward
from alignkit.rollout import generate
from alignkit.runs import RunDir
from alignkit.training import Engine

STAGE = "best-of-n"


# --------------------------------------------------------------------------- config


@dataclass
class RewardSection:
    spec: str | dict[str, Any] = opt("profanity", help="a reward spec, as for PPO: profanity, rule:..., rm:PATH, "
                                                       "classifier:MODEL:LABEL, python:mod:fn, or a mapping")


@dataclass
class SamplingSection:
    n: int = opt(8, ge=1, help="samples per prompt")
    keep: int = opt(1, ge=1, help="keep the top k of the n samples of each prompt")
    rounds: int = opt(1, ge=1, help="sample -> keep -> fine-tune, each round from the newest model")
    final_sample: bool = opt(True, help="sample the final model once more to report what fine-tuning bought")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(
        path="builtin:prompts", format="prompts", kind="red_team", max_prompt_length=128))
    reward: RewardSection = field(default_factory=RewardSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=1e-4, batch_size=4, epochs=1))
    run: RunConfig = field(default_factory=RunConfig)


def check_config(cfg: Config) -> None:
    if cfg.sampling.keep > cfg.sampling.n:
        raise ConfigError(f"sampling.keep={cfg.sampling.keep} must be <= sampling.n={cfg.sampling.n}")
    if not cfg.data.path:
        raise ConfigError("data.path is empty: give prompts (a file, a hub dataset or builtin:prompts)")
    if cfg.sampling.n > 1 and not cfg.generation.do_sample:
        raise ConfigError(f"sampling.n={cfg.sampling.n} samples per prompt with generation.do_sample=false are "
                          f"{cfg.sampling.n} identical answers, the best of them the one greedy answer; "
                          f"set generation.do_sample=true (or sampling.n=1)")


# --------------------------------------------------------------------------- one round's pieces


@dataclass
class Samples:
    """N responses per prompt and their scores, prompt-major: ``scores[p, s]``."""

    texts: list[list[str]]
    finished: np.ndarray  # (P, N) bool
    scores: np.ndarray  # (P, N)


def sample_and_score(model, tok, prompts: list[PromptExample], cfg: Config, reward_fn, seed: int,
                     engine=None) -> Samples:
    """Phases 1 and 2: n samples per prompt from the model, one reward score each.

    With an engine, each process samples and scores its share of the prompts; all get everything.
    """
    from alignkit.training import SingleProcess

    engine = engine or SingleProcess()
    n = cfg.sampling.n
    gens = generate(model, tok, [p.prompt for p in prompts], cfg.generation, n=n, seed=seed, engine=engine)
    texts = [[g.text for g in gens[i * n:(i + 1) * n]] for i in range(len(prompts))]
    flat_prompts = [p.prompt for p in prompts for _ in range(n)]
    flat_texts = [t for row in texts for t in row]
    flat_kinds = [p.kind for p in prompts for _ in range(n)]
    with engine.together():
        mine = call_reward(reward_fn, engine.shard(flat_prompts), engine.shard(flat_texts),
                           engine.shard(flat_kinds) if any(flat_kinds) else None)
    scores = np.asarray(engine.gather(mine.tolist()), dtype=np.float64)
    finished = np.array([g.finished for g in gens]).reshape(len(prompts), n)
    return Samples(texts, finished, scores.reshape(len(prompts), n))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores of each row, best first; ties keep sample order.

    >>> top_k(np.array([[0.1, 0.9, 0.5], [0.3, 0.3, 0.2]]), 2).tolist()
    [[1, 2], [0, 1]]
    """
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def round_metrics(samples: Samples, kept: np.ndarray) -> dict[str, float]:
    """Mean best-of-N score vs the mean score of a single sample (and what was kept)."""
    s = samples.scores
    kept_scores = np.take_along_axis(s, kept, axis=1)
    return {
        "mean_best_score": float(s.max(axis=1).mean()),
        "mean_single_score": float(s.mean()),
        "best_minus_single": float(s.max(axis=1).mean() - s.mean()),
        "mean_kept_score": float(kept_scores.mean()),
        "min_score": float(s.min()),
        "std_score": float(s.std()),
        "finished_share": float(samples.finished.mean()),
        "mean_words": float(np.mean([len(t.split()) for row in samples.texts for t in row])),
        "prompts": float(s.shape[0]),
        "samples_per_prompt": float(s.shape[1]),
    }


def write_dataset(path: Path, prompts: list[PromptExample], samples: Samples, kept: np.ndarray,
                  round_no: int, write: bool = True) -> list[SFTExample]:
    """Phase 3: the kept responses as an SFT data set (JSONL with scores), and as examples.

    ``write=False`` (processes other than the main one) returns the examples only.
    """
    examples = []
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") if write else open(os.devnull, "w") as f:
        line = 0
        for p, prompt in enumerate(prompts):
            for rank, s in enumerate(kept[p]):
                text = samples.texts[p][s]
                if not text.strip():  # nothing to learn from; the scores still count above
                    continue
                line += 1
                f.write(json.dumps({"prompt": prompt.prompt, "completion": text, "score": float(samples.scores[p, s]),
                                    "scores": samples.scores[p].tolist(), "rank": rank + 1, "round": round_no,
                                    "finished": bool(samples.finished[p, s]), "prompt_id": prompt.id}) + "\n")
                examples.append(SFTExample(prompt.prompt, text, f"{path}:line {line}"))
    if write:
        tmp.replace(path)  # a kill mid-write never leaves a half data set that resume would trust
    return examples


def read_dataset(path: Path) -> list[SFTExample]:
    """A round's data set written by :func:`write_dataset` (when resuming)."""
    from alignkit.data.formats import load_sft

    return load_sft(str(path))


def _sft_config(cfg: Config, round_no: int):
    from alignkit.recipes import sft

    return sft.Config(model=cfg.model, train=cfg.train,
                      data=DataConfig(format="sft", max_length=cfg.data.max_length, on_error=cfg.data.on_error),
                      run=RunConfig(name=cfg.run.name, output_dir=cfg.run.output_dir, seed=cfg.run.seed + round_no))


def _round_seed(cfg: Config, round_no: int) -> int:
    return cfg.run.seed * 1000 + round_no


def load_round_weights(model, final: Path) -> None:
    """Put a finished round's trained weights into ``model`` (resume skips that round's training)."""
    from safetensors.torch import load_file

    if is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(final / "adapter" / "adapter_model.safetensors")))
    else:
        missing, unexpected = model.load_state_dict(load_file(str(final / "model.safetensors")), strict=False)
        if unexpected:
            raise AlignkitError(f"{final}: does not match the model ({len(unexpected)} unexpected weights)")


def _link_final(run: RunDir, target: Path) -> None:
    """``final`` -> the newest round's model, without a second copy of the weights."""
    if run.final.is_symlink() or run.final.is_file():
        run.final.unlink()
    elif run.final.exists():
        shutil.rmtree(run.final)
    try:
        run.final.symlink_to(os.path.relpath(target, run.path), target_is_directory=True)
    except OSError:  # no symlinks on this file system
        shutil.copytree(target, run.final)


# --------------------------------------------------------------------------- the recipe


def main(cfg: Config, resume: bool = False) -> dict:
    check_config(cfg)
    run = RunDir(cfg.run.output_dir, cfg.run.name, STAGE)
    if resume and run.is_done():
        print(f"alignkit best-of-n: {run.path} is already complete")
        return json.loads((run.path / "DONE").read_text() or "{}")

    # -- setup: prompts, reward, the model, all on the engine's device (each round's
    #    fine-tuning runs on an engine of its own, for cfg.train's precision)
    prompts = load_prompts(cfg.data.path, cfg.data.split, cfg.data.on_error, cfg.data.kind, cfg.data.limit,
                           fmt=cfg.data.format)
    engine = Engine(seed=cfg.run.seed)
    if engine.is_main:
        run.write_config(cfg)
    reward_fn = build_reward(cfg.reward.spec, device=engine.device)
    tok = load_tokenizer(cfg.model.name, cfg.model.cache_dir)
    model = engine.place(load_causal_lm(cfg.model, trainable=True, tokenizer=tok))
    prompts, _ = encode_prompts(tok, prompts, cfg.data.max_prompt_length, cfg.data.on_error,
                                context=model_context(model), max_new_tokens=cfg.generation.max_new_tokens)
    if not prompts:
        raise AlignkitError(f"{cfg.data.path}: every prompt was skipped (see the warning above)")
    from alignkit.recipes.sft import train_sft

    done_rounds = 0
    if resume:
        while (run.path / f"round-{done_rounds + 1}" / "sft" / "DONE").exists() and done_rounds < cfg.sampling.rounds:
            done_rounds += 1
    logger = engine.open_log(run, resume_step=done_rounds if resume else None)
    if done_rounds:
        load_round_weights(model, run.path / f"round-{done_rounds}" / "sft" / "final")
        print(f"alignkit best-of-n: resuming after round {done_rounds}")
    history = [json.loads((run.path / f"round-{r}" / "summary.json").read_text()) for r in range(1, done_rounds + 1)]

    for round_no in range(done_rounds + 1, cfg.sampling.rounds + 1):
        folder = run.path / f"round-{round_no}"
        folder.mkdir(exist_ok=True)
        dataset = folder / "dataset.jsonl"
        if resume and dataset.exists() and (folder / "summary.json").exists():
            # the samples of this round are written; only its fine-tuning was cut short
            examples = read_dataset(dataset)
            row = json.loads((folder / "summary.json").read_text())
        else:
            # 1. sample n per prompt from the newest model; 2. score
            t0 = time.time()
            samples = sample_and_score(model, tok, prompts, cfg, reward_fn, seed=_round_seed(cfg, round_no),
                                       engine=engine)
            # 3. keep the top k per prompt, write the SFT data set with its scores
            kept = top_k(samples.scores, cfg.sampling.keep)
            examples = write_dataset(dataset, prompts, samples, kept, round_no, write=engine.is_main)
            row = {**round_metrics(samples, kept), "sample_seconds": round(time.time() - t0, 1)}
            if engine.is_main:
                (folder / "summary.json").write_text(json.dumps(row, indent=2))
        engine.print(f"alignkit best-of-n: round {round_no}: mean best-of-{cfg.sampling.n} score "
              f"{row['mean_best_score']:.4f} vs single sample {row['mean_single_score']:.4f}; "
              f"{len(examples)} examples -> {dataset}")
        if not examples:
            raise AlignkitError(f"best-of-n round {round_no}: every kept response is empty; nothing to fine-tune on")

        # 4. fine-tune the model in memory on the kept responses (alignkit sft's loop)
        t0 = time.time()
        final = train_sft(_sft_config(cfg, round_no), examples, folder / "sft", resume=resume, model=model,
                          tokenizer=tok)
        row["fine_tune_seconds"] = round(time.time() - t0, 1)
        row["sft_train_loss"] = json.loads((folder / "sft" / "DONE").read_text()).get("train_loss")
        if engine.is_main:
            (folder / "summary.json").write_text(json.dumps(row, indent=2))
            _link_final(run, final)
        logger.log(round_no, {**row, "round": round_no})
        history.append(row)

    # -- what the fine-tuning bought: the final model's single-sample score on the same prompts
    summary: dict = {"rounds": cfg.sampling.rounds, "n": cfg.sampling.n, "keep": cfg.sampling.keep,
                     "reward": str(cfg.reward.spec), "per_round": history}
    if cfg.sampling.final_sample:
        t0 = time.time()
        # round 1's seed: the same prompts and random numbers, so the comparison is paired
        samples = sample_and_score(model, tok, prompts, cfg, reward_fn, seed=_round_seed(cfg, 1), engine=engine)
        after = {**round_metrics(samples, top_k(samples.scores, cfg.sampling.keep)),
                 "sample_seconds": round(time.time() - t0, 1), "round": cfg.sampling.rounds + 1, "final": 1}
        logger.log(cfg.sampling.rounds + 1, after)
        summary["final"] = after
        engine.print(f"alignkit best-of-n: final model: mean single-sample score {after['mean_single_score']:.4f} "
              f"(round 1 before fine-tuning: {history[0]['mean_single_score']:.4f}); "
              f"best-of-{cfg.sampling.n} {after['mean_best_score']:.4f}")
    logger.close()
    summary["generation"] = to_dict(cfg.generation)
    engine.finish(run, summary)
    return summary
