"""Compare two or more models on held-out prompts; write an HTML report and metrics.json.

    alignkit eval --config configs/eval.yaml
    alignkit eval --config configs/eval.yaml samples_per_prompt=25 prompts.limit=200

Each model samples ``samples_per_prompt`` responses per prompt once; every
metric reads those samples (see :mod:`alignkit.eval.metrics`): toxicity (mean,
std, relative improvement against the baseline, expected max over k, share of
prompts >= 0.5), reward-model score, KL to the reference, refusal rate,
helpfulness (not on prompts of unsafe kinds), length, distinct-n; then pairwise
win / tie / loss from an AI judge (positions swapped) or a human evaluation
exported by the feedback app. With prompts of several kinds (``kind``: red_team,
helpful, ...) every metric and every pairwise row is also given per kind, and the
report leads with a per-kind table. The report goes to
``runs/NAME/eval/final/report.html`` with ``metrics.json`` and every sample in
``samples.jsonl``; the summary table and the report path are printed last.

A model ``path`` is anything :mod:`alignkit.models` loads, or a run folder
(``runs/demo/dpo``): its ``final/`` is loaded and its ``metrics.jsonl`` gives
the training curves. With LoRA outputs (merged weights in ``final/``) the
right reference is the base model the adapter was trained on.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from alignkit.config import DataConfig, GenerationConfig, ModelConfig, RunConfig, opt
from alignkit.data.collate import encode_prompts
from alignkit.data.formats import load_preferences, load_prompts, prompt_text
from alignkit.errors import AlignkitError, ConfigError
from alignkit.eval import metrics as M
from alignkit.eval.refusal import detect_refusals
from alignkit.eval.report import render_summary_table, write_report
from alignkit.models import context_of, load_causal_lm, load_tokenizer
from alignkit.rewards import build_reward
from alignkit.rollout import generate
from alignkit.runs import RunDir, read_metrics
from alignkit.training import Engine, SingleProcess

STAGE = "eval"
HUMAN = "human:"
SAMPLES_FILE = "samples.jsonl"


@dataclass
class EvalModel:
    name: str = opt("", help="the model's name in the report; default: its path")
    path: str = opt("", help="model name, folder, or a run folder whose final/ is loaded")
    run_dir: str = opt("", help="a training run folder whose metrics.jsonl gives curves (default: path, "
                                "when it is a run folder)")
    temperature: float | None = opt(None, gt=0, help="sampling temperature for this model; default generation's")
    dtype: str = opt("float32", choices=("float32", "bfloat16", "float16", "auto"))
    seed: int = opt(0, help="tiny:... random models only")
    best_of: int = opt(1, ge=1, help="inference-time best-of-N: each sample is the highest-reward of N "
                                     "drawn from this model")
    best_of_reward: str = opt("", help="the reward spec that picks the best of N; default: reward_model")
    round: int | None = opt(None, ge=0, help="the pipeline round that made this model: the report adds a "
                                            "per-round table and curve")


@dataclass
class ToxicityConfig:
    scorer: str = opt("profanity", help="a reward spec: profanity (offline), classifier:MODEL:LABEL, python:m:f")
    invert: bool = opt(True, help="toxicity = 1 - score (rewards are higher-is-better); false when the "
                                  "scorer returns P(toxic)")


@dataclass
class PairwiseConfig:
    model_a: str = ""
    model_b: str = ""
    judge: str = opt("", help="python:module:function, judge:..., or human:winloss_summary.json; "
                              "default: the top-level judge")


def _test_prompts() -> DataConfig:
    return DataConfig(path="builtin:prompts", split="test", format="prompts")


def _held_out_pairs() -> DataConfig:
    return DataConfig(path="", split="test")


@dataclass
class Config:
    models: list[EvalModel] = field(default_factory=list)
    baseline: str = opt("", help="the model others are compared with; default the first")
    reference: str = opt("", help="KL reference: a model name from models, or a model path; default the first")
    prompts: DataConfig = field(default_factory=_test_prompts)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    samples_per_prompt: int = opt(25, ge=1, help="k for expected max toxicity (RealToxicityPrompts uses 25)")
    toxicity: ToxicityConfig = field(default_factory=ToxicityConfig)
    reward_model: str | dict | None = opt(None, help="a reward spec (rm:PATH, ...) for reward scores")
    preference_data: DataConfig = field(default_factory=_held_out_pairs)
    pairwise: list[PairwiseConfig] = field(default_factory=list)
    judge: str = opt("", help="default judge for pairwise entries without one")
    judge_options: dict = opt(default_factory=dict, help="judge:TEMPLATE only: alignkit.judges JudgeConfig "
                                                         "fields (model, mode, backend, ...)")
    confidence: float = opt(0.95, gt=0, lt=1)
    kl_budget: float | None = opt(None, gt=0, help="nats per response: the KL to the reference a tuned model "
                                                   "may spend; recorded in metrics.json, checked by the demo")
    refusals: bool = opt(True, help="the refusal rate by alignkit's refusal detector (alignkit.eval.refusal)")
    helpfulness: str = opt("helpfulness", help="a reward spec scoring helpfulness in [0, 1] (default: the "
                                               "offline judge alignkit.eval.helpfulness); '' turns it off")
    unsafe_kinds: list[str] = opt(default_factory=lambda: ["red_team"],
                                  help="prompt kinds whose answers get no helpfulness score (declining is right)")
    report_samples: int = opt(20, ge=0, help="prompts shown side by side in the report")
    run: RunConfig = field(default_factory=lambda: RunConfig(name="eval"))


# ---------------------------------------------------------------------------
# setup helpers


@dataclass(frozen=True)
class _Model:
    name: str
    load_path: str
    curves_dir: str
    temperature: float
    dtype: str
    seed: int
    best_of: int = 1
    best_of_reward: str | dict | None = None

    def same_weights(self, other: _Model) -> bool:
        return (self.load_path, self.dtype, self.seed) == (other.load_path, other.dtype, other.seed)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n, the closed form used since Stiennon et al.
    (2020); Beirami et al. (2024) show it is an upper bound on the exact value."""
    return float(np.log(n) - (n - 1) / n)


def _resolve(entry: EvalModel, gen: GenerationConfig, reward_model: str | dict | None = None) -> _Model:
    """A run folder loads its final/ and gives its curves; any other path loads as given."""
    load_path, curves_dir = entry.path, entry.run_dir
    folder = Path(entry.path)
    if (folder / "final" / "config.json").is_file():
        load_path, curves_dir = str(folder / "final"), entry.run_dir or str(folder)
    elif (folder / "config.json").is_file() and not curves_dir and (folder.parent / "metrics.jsonl").is_file():
        curves_dir = str(folder.parent)
    temperature = entry.temperature if entry.temperature is not None else gen.temperature
    # Greedy decoding is the limit of low temperature; score KL on the plain softmax.
    return _Model(entry.name or entry.path, load_path, curves_dir, temperature if gen.do_sample else 1.0,
                  entry.dtype, entry.seed, entry.best_of, entry.best_of_reward or reward_model)


def _looks_local(path: str) -> bool:
    """A folder path rather than a hub id (``org/name``), ``builtin:...`` or ``tiny:...``."""
    return path.startswith((".", "/", "~")) or path.count("/") >= 2 or "\\" in path


def _check(cfg: Config) -> tuple[list[_Model], str, str]:
    """Fail on a config mistake before minutes of sampling, naming the key."""
    if len(cfg.models) < 1:
        raise ConfigError("eval: 'models' needs at least one entry {name, path}")
    for i, entry in enumerate(cfg.models):
        if not entry.path:
            raise ConfigError(f"eval: 'models[{i}].path' is empty")
        if _looks_local(entry.path) and not Path(entry.path).exists():
            raise ConfigError(f"eval: 'models[{i}].path' {entry.path!r} does not exist (train it first, "
                              f"e.g. alignkit dpo -c configs/dpo.yaml, or point at a model folder)")
        if entry.best_of > 1 and not (entry.best_of_reward or cfg.reward_model):
            raise ConfigError(f"eval: 'models[{i}].best_of' is {entry.best_of} but there is no reward to pick "
                              f"the best with: set 'models[{i}].best_of_reward' or 'reward_model'")
        if entry.best_of > 1 and not cfg.generation.do_sample:
            raise ConfigError(f"eval: 'models[{i}].best_of' > 1 with generation.do_sample=false draws "
                              f"{entry.best_of} identical samples")
    models = [_resolve(entry, cfg.generation, cfg.reward_model) for entry in cfg.models]
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ConfigError(f"eval: model names must be unique, got {names}")
    baseline = cfg.baseline or names[0]
    if baseline not in names:
        raise ConfigError(f"eval: 'baseline' is {baseline!r}, not one of the models {names}")
    for i, pair in enumerate(cfg.pairwise):
        for key in ("model_a", "model_b"):
            if getattr(pair, key) not in names:
                raise ConfigError(f"eval: 'pairwise[{i}].{key}' is {getattr(pair, key)!r}, not one of {names}")
        if pair.model_a == pair.model_b:
            raise ConfigError(f"eval: 'pairwise[{i}]' compares {pair.model_a!r} with itself")
        if not (pair.judge or cfg.judge):
            raise ConfigError(f"eval: 'pairwise[{i}].judge' is empty and there is no top-level 'judge'")
    if cfg.samples_per_prompt > 1 and not cfg.generation.do_sample:
        raise ConfigError("eval: samples_per_prompt > 1 with generation.do_sample=false gives k identical "
                          "samples; set samples_per_prompt=1 or sample")
    return models, baseline, cfg.reference or names[0]


def _load(model: _Model, engine: Engine):
    tokenizer = load_tokenizer(model.load_path)
    lm = load_causal_lm(ModelConfig(name=model.load_path, dtype=model.dtype, seed=model.seed),
                        trainable=False, tokenizer=tokenizer)
    return engine.place(lm), tokenizer


def _scores(engine, fn, prompts: list, texts: list[str], kinds: list | None = None) -> np.ndarray:
    """``fn(prompts, texts[, kinds])`` with each process scoring its share; every process gets all scores."""
    engine = engine or SingleProcess()
    with engine.together():
        args = (engine.shard(prompts), engine.shard(texts)) + ((engine.shard(kinds),) if kinds is not None else ())
        mine = np.asarray(fn(*args), dtype=np.float64).tolist()
    return np.asarray(engine.gather(mine), dtype=np.float64)


def _fitting_prompts(cfg: Config, models: list[_Model], reference_name: str, prompts: list) -> list:
    """The prompts within prompts.max_prompt_length and, with generation.max_new_tokens after them,
    every model's context, checked with each model's tokenizer before anything loads or samples.
    With prompts.on_error=skip a prompt too long for one model is left out for all (the comparison is paired)."""
    paths = dict.fromkeys([m.load_path for m in models] + ([] if reference_name in {m.name for m in models}
                                                           else [reference_name]))
    kept = list(prompts)
    for path in paths:
        tok = load_tokenizer(path)
        kept, _ = encode_prompts(tok, kept, cfg.prompts.max_prompt_length, cfg.prompts.on_error,
                                 setting="prompts.max_prompt_length", context=context_of(ModelConfig(name=path)),
                                 max_new_tokens=cfg.generation.max_new_tokens)
    if not kept:
        raise AlignkitError(f"{cfg.prompts.path}: every prompt was skipped (see the warning above)")
    return kept


def _thin_sample_warnings(kinds: list) -> list[str]:
    """Intervals and paired tests are over prompts: with one prompt (overall or of a kind) they are
    undefined and the report shows '-' for them; said under the table rather than left to be noticed."""
    lines = []
    if len(kinds) < 2:
        lines.append(f"{len(kinds)} prompt: no intervals or paired tests (they need at least 2 prompts); "
                     f"every number is one prompt's")
    elif len(set(kinds)) > 1 or any(kind is not None for kind in kinds):
        single = sorted(str(kind) for kind in set(kinds) if kinds.count(kind) == 1)
        if single:
            lines.append(f"one prompt of kind {', '.join(single)}: that kind's rows have no intervals or "
                         f"paired tests (they need at least 2 prompts)")
    return lines


def _same_vocab(tok_a, tok_b) -> bool:
    return len(tok_a) == len(tok_b) and tok_a.get_vocab() == tok_b.get_vocab()


def _release_memory() -> None:
    """Give a finished model's memory back before the next one loads (one or two models at a time)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# the recipe


def main(cfg: Config, resume: bool = False) -> Path:
    """Run the evaluation; returns the report path. ``resume`` is accepted for the CLI:
    an evaluation keeps no checkpoints and starts over."""
    # 0. setup: check everything cheap before the expensive sampling
    models, baseline_name, reference_name = _check(cfg)
    engine = Engine(seed=cfg.run.seed)
    run = RunDir(cfg.run.output_dir, cfg.run.name, STAGE)
    if engine.is_main:
        run.write_config(cfg)
    prompts = load_prompts(cfg.prompts.path, split=cfg.prompts.split, on_error=cfg.prompts.on_error,
                           kind=cfg.prompts.kind, limit=cfg.prompts.limit, setting="prompts.format")
    prompts = _fitting_prompts(cfg, models, reference_name, prompts)
    messages = [p.prompt for p in prompts]
    k = cfg.samples_per_prompt
    kinds = [p.kind for p in prompts]
    toxicity_fn = M.ToxicityScorer(cfg.toxicity.scorer, cfg.toxicity.invert, device=engine.device)
    reward_fn = build_reward(cfg.reward_model, device=engine.device) if cfg.reward_model else None
    helpful_fn = build_reward(cfg.helpfulness, device=engine.device) if cfg.helpfulness else None
    judges = []  # per pairwise entry: a judge function, or the counts of a human evaluation
    for pair in cfg.pairwise:
        spec = pair.judge or cfg.judge
        if spec.startswith(HUMAN):
            judges.append(M.load_human_summary(spec[len(HUMAN):], pair.model_a, pair.model_b))
        else:
            judges.append(M.build_pairwise_judge(spec, cfg.judge_options, engine.device))
    pairs = None
    if cfg.preference_data.path:
        pairs = load_preferences(cfg.preference_data.path, split=cfg.preference_data.split,
                                 on_error=cfg.preference_data.on_error, fmt=cfg.preference_data.format,
                                 limit=cfg.preference_data.limit)
    engine.print(f"eval: {len(models)} models x {len(prompts)} prompts x {k} samples; reference "
                 f"{reference_name!r}, baseline {baseline_name!r}, {engine.num_processes} process(es) -> {run.path}")

    # 1. reward-model accuracy on held-out pairs (a property of the reward model, not of a policy)
    rm_accuracy = M.reward_model_accuracy(reward_fn, pairs, cfg.confidence) if reward_fn and pairs else None

    # 2. sample every model once, 3. KL to the reference on each model's own samples
    samples, kl, timings = _sample_models(cfg, models, reference_name, messages, kinds, reward_fn, engine)

    # 4. score the samples: toxicity and reward, all models on the same prompts (each process its share)
    scores: dict[str, M.ModelScores] = {}
    repeated = [m for m in messages for _ in range(k)]  # prompt-major, as the samples
    repeated_kinds = [kind for kind in kinds for _ in range(k)]
    reward_of = (lambda p, t, kd: M.reward_scores(reward_fn, p, t, kd)) if reward_fn else None
    helpful_rows = np.array([kind not in cfg.unsafe_kinds for kind in kinds], dtype=bool)
    for model in models:
        s = samples[model.name]
        reward = _scores(engine, reward_of, repeated, list(s.texts), repeated_kinds) if reward_of else None
        helpfulness = None
        if helpful_fn is not None and helpful_rows.any():
            rows = np.repeat(helpful_rows, k)
            helpfulness = np.full(len(s.texts), np.nan)
            helpfulness[rows] = _scores(engine, lambda p, t: M.reward_scores(helpful_fn, p, t),
                                        [m for m, r in zip(repeated, rows) if r],
                                        [t for t, r in zip(s.texts, rows) if r])
        scores[model.name] = M.ModelScores(
            name=model.name,
            toxicity=M.by_prompt(_scores(engine, toxicity_fn, repeated, list(s.texts)), k),
            length=M.by_prompt(s.lengths(), k),
            finished=M.by_prompt(s.finished, k),
            texts=s.texts,
            reward=None if reward is None else M.by_prompt(reward, k),
            kl=None if kl[model.name] is None else M.by_prompt(kl[model.name], k),
            refusal=M.by_prompt(detect_refusals(s.texts), k) if cfg.refusals else None,
            helpfulness=None if helpfulness is None else M.by_prompt(helpfulness, k),
        )

    # 5. per-model metrics with intervals, the baseline's as the "before"; the main process
    #    judges the pairs and writes the report
    if not engine.is_main:
        engine.wait()
        return run.final / "report.html"
    baseline = scores[baseline_name]
    split = len({kind for kind in kinds}) > 1 or any(kind is not None for kind in kinds)
    report_models = [
        {"name": m.name, "metrics": M.summarise(scores[m.name], baseline, cfg.confidence, cfg.run.seed),
         **({"by_kind": M.summarise_by_kind(scores[m.name], baseline, kinds, cfg.confidence, cfg.run.seed)}
            if split else {}),
         "toxicity_scores": scores[m.name].toxicity.ravel().tolist()}
        for m in models
    ]

    # 6. pairwise: one item per prompt (each model's first sample), split by kind too
    pairwise, judge_notes = _compare(cfg, judges, messages, kinds if split else None, samples)

    # 7. report: summary table, plots, curves from training runs, samples side by side
    summary = {
        "title": f"alignkit eval: {' vs '.join(m.name for m in models)}",
        "run": {**_run_info(cfg, models, prompts, baseline_name, reference_name, rm_accuracy, timings),
                **judge_notes},
        "models": report_models,
        "pairwise": pairwise,
        "rounds": [{"round": e.round, "model": m.name} for e, m in zip(cfg.models, models) if e.round is not None],
        "curves": {m.name: rows for m in models if m.curves_dir and (rows := read_metrics(m.curves_dir))},
        "samples": _sample_rows(prompts, models, scores, k, cfg.report_samples),
    }
    report = write_report(run.final, summary)
    extra = {"reward_model_accuracy": rm_accuracy, "kl_budget": cfg.kl_budget}
    _add_to_metrics_json(run.final / "metrics.json", {k: v for k, v in extra.items() if v is not None})
    _write_samples(run.final / SAMPLES_FILE, prompts, models, samples, scores, k)
    run.mark_done({"report": str(report)})
    print(render_summary_table(summary))
    for line in _thin_sample_warnings(kinds):  # beside the table whose '-' it explains
        print(f"eval: warning: {line}")
    print(f"report: {report}")
    engine.wait()
    return report


# ---------------------------------------------------------------------------
# the phases


def _sample_models(cfg: Config, models: list[_Model], reference_name: str, messages: list, kinds: list,
                   reward_fn, engine: Engine) -> tuple:
    """k samples per prompt from every model, and each sample's KL to the reference.

    The reference is loaded first and stays loaded, so every other model is
    scored against it right after sampling: at most two models in memory. Each
    process samples and scores its share of the prompts; all get every result.
    """
    k = cfg.samples_per_prompt
    by_name = {m.name: m for m in models}
    # A reference outside the compared models (e.g. a LoRA run's base) is loaded, never sampled.
    reference = by_name.get(reference_name) or _Model(reference_name, reference_name, "", 1.0, "float32", 0)
    order = [reference.name] if reference.name in by_name else []
    order += [m.name for m in models if m.name != reference.name]
    ref_lm, ref_tok = _load(reference, engine)
    samples: dict[str, M.ModelSamples] = {}
    kl: dict[str, np.ndarray | None] = {}
    timings: dict[str, float] = {}
    # best-of-N reward functions, built once per spec; reward_model's is already loaded
    pickers = {json.dumps(cfg.reward_model, sort_keys=True): reward_fn} if reward_fn else {}
    bar, task = engine.progress(sum(by_name[n].best_of for n in order) * len(messages) * k, "sampling")
    with bar:
        for name in order:
            started = time.perf_counter()
            model = by_name[name]
            # The reference's weights under another name (e.g. its best-of-N) reuse the loaded copy.
            reuse = name == reference.name or model.same_weights(reference)
            lm, tok = (ref_lm, ref_tok) if reuse else _load(model, engine)
            bar.update(task, info=name)
            gen = dataclasses.replace(cfg.generation, temperature=model.temperature)
            generations = generate(lm, tok, messages, gen, n=k * model.best_of, seed=cfg.run.seed,
                                   progress_cb=lambda n: bar.advance(task, n), engine=engine)
            if model.best_of > 1:
                key = json.dumps(model.best_of_reward, sort_keys=True)
                if key not in pickers:
                    pickers[key] = build_reward(model.best_of_reward, device=engine.device)
                generations = _best_of(generations, messages, model.best_of, pickers[key], engine, kinds)
            samples[name] = M.ModelSamples.from_generations(name, generations, k, model.temperature,
                                                            tok.eos_token_id)
            if model.same_weights(reference) and model.best_of > 1:
                kl[name] = np.full(len(generations), best_of_n_kl(model.best_of))
            elif model.same_weights(reference):
                kl[name] = np.zeros(len(generations))  # the same weights (e.g. at another temperature): exactly 0
            elif model.best_of > 1:
                print(f"eval: {name!r} is best-of-{model.best_of} of a model other than the reference; no KL")
                kl[name] = None
            elif _same_vocab(tok, ref_tok):
                kl[name] = M.response_kl(lm, ref_lm, samples[name], tok.pad_token_id, cfg.generation.batch_size,
                                         engine)
            else:
                print(f"eval: {name!r} and the reference {reference.name!r} use different tokenizers; no KL")
                kl[name] = None
            if lm is not ref_lm:
                del lm, tok
                _release_memory()
            timings[name] = time.perf_counter() - started
            if engine.is_main:
                bar.console.print(f"eval: sampled {name!r}: {len(generations)} responses in {timings[name]:.0f} s")
    del ref_lm, ref_tok
    _release_memory()
    return samples, kl, timings


def _best_of(generations: list, messages: list, n: int, reward_fn, engine=None, kinds: list | None = None) -> list:
    """Keep the highest-reward generation of each consecutive group of ``n`` (prompt-major
    order: the groups never mix prompts); the first of equal scores wins. A gated reward
    routes on ``kinds``."""
    per = len(generations) // len(messages)
    repeated = [m for m in messages for _ in range(per)]
    scores = _scores(engine, lambda p, t, kd: M.reward_scores(reward_fn, p, t, kd), repeated,
                     [g.text for g in generations],
                     [kind for kind in (kinds or [None] * len(messages)) for _ in range(per)]).reshape(-1, n)
    return [generations[g * n + int(i)] for g, i in enumerate(scores.argmax(axis=1))]


def _counts(outcomes: list[str]) -> dict[str, int]:
    return {key: outcomes.count(outcome) for key, outcome in (("wins", "win"), ("ties", "tie"), ("losses", "loss"))}


def _compare(cfg: Config, judges: list, messages: list, kinds: list | None,
             samples: dict[str, M.ModelSamples]) -> tuple[list, dict]:
    """Win / tie / loss per pairwise entry, from a judge on the first samples or a human evaluation;
    with ``kinds``, an AI judge's rows also count per prompt kind (``by_kind``)."""
    k = cfg.samples_per_prompt
    rows, notes = [], {}
    for pair, judge in zip(cfg.pairwise, judges):
        spec = pair.judge or cfg.judge
        by_kind = {}
        if isinstance(judge, dict):
            counts = judge
        else:
            # One item per prompt: k samples of a prompt are not independent items for the sign test.
            outcomes = judge.compare(messages, list(samples[pair.model_a].texts[::k]),
                                     list(samples[pair.model_b].texts[::k]), kinds)
            notes[f"judge {spec}: {pair.model_a} vs {pair.model_b}"] = judge.notes()
            counts = _counts(outcomes)
            labels = [kind if kind is not None else "untagged" for kind in kinds] if kinds is not None else []
            for kind in sorted(set(labels)):
                c = _counts([o for o, label in zip(outcomes, labels) if label == kind])
                by_kind[kind] = M.pairwise_entry(pair.model_a, pair.model_b, spec, c["wins"], c["ties"],
                                                 c["losses"], cfg.confidence, cfg.run.seed)
        # A human evaluation is labelled by its file name; the full path is in the run info.
        label = f"{HUMAN}{Path(spec[len(HUMAN):]).name}" if spec.startswith(HUMAN) else spec
        row = M.pairwise_entry(pair.model_a, pair.model_b, label, counts["wins"], counts["ties"],
                               counts["losses"], cfg.confidence, cfg.run.seed)
        if by_kind:
            row["by_kind"] = by_kind
        warning = getattr(judge, "warning", lambda: None)()
        if warning:  # ties the judge could not help: the console says so, not only the report
            row["warning"] = warning
        rows.append(row)
    return rows, notes


# ---------------------------------------------------------------------------
# report pieces


def _run_info(cfg: Config, models: list[_Model], prompts, baseline: str, reference: str, rm_accuracy,
              timings: dict[str, float]) -> dict[str, str]:
    gen = cfg.generation
    info = {
        "models": "; ".join(f"{m.name} = {m.load_path} (T={m.temperature:g})"
                            + (f", best of {m.best_of} by {m.best_of_reward}" if m.best_of > 1 else "")
                            for m in models),
        "prompts": f"{cfg.prompts.path} split={cfg.prompts.split}" + (f" kind={cfg.prompts.kind}"
                                                                      if cfg.prompts.kind else "")
                   + f": {len(prompts)} prompts",
        "samples per prompt (k)": str(cfg.samples_per_prompt),
        "generation": f"max_new_tokens={gen.max_new_tokens} top_p={gen.top_p} top_k={gen.top_k} "
                      f"do_sample={gen.do_sample} seed={cfg.run.seed}",
        "toxicity scorer": f"{cfg.toxicity.scorer}" + (" (toxicity = 1 - score)" if cfg.toxicity.invert else ""),
        "baseline (before)": baseline,
        "KL reference": f"{reference} (sequence-level k1 on each model's own samples)",
        "intervals": f"{cfg.confidence:.0%}, bootstrap (BCa) over prompts; proportions: Wilson",
        "pairwise items": "one per prompt (each model's first sample); AI judges see both orders",
        "sampling time": ", ".join(f"{n} {t:.0f} s" for n, t in timings.items()),
    }
    for pair in cfg.pairwise:
        spec = pair.judge or cfg.judge
        if spec.startswith(HUMAN):
            info[f"human evaluation {pair.model_a} vs {pair.model_b}"] = spec[len(HUMAN):]
    if cfg.reward_model:
        info["reward model"] = str(cfg.reward_model)
    if cfg.kl_budget is not None:
        info["KL budget"] = f"{cfg.kl_budget:g} nats per response"
    if rm_accuracy is not None:
        info["reward model accuracy"] = (f"{rm_accuracy['value']:.3f} [{rm_accuracy['low']:.3f}, "
                                         f"{rm_accuracy['high']:.3f}] on {rm_accuracy['n']} held-out pairs "
                                         f"({cfg.preference_data.path}); ties count wrong")
    return info


def _sample_rows(prompts, models: list[_Model], scores: dict[str, M.ModelScores], k: int, limit: int) -> list[dict]:
    """The first sample of ``limit`` prompts spread evenly over the set (a prompt file is
    often grouped by kind; the first rows alone would show one kind)."""
    rows = []
    shown = sorted({int(i) for i in np.linspace(0, len(prompts) - 1, min(limit, len(prompts))).round()})
    for i in shown:
        prompt = prompts[i]
        responses = {}
        for m in models:
            s = scores[m.name]
            row_scores = {"toxicity": float(s.toxicity[i, 0])}
            if s.reward is not None:
                row_scores["reward"] = float(s.reward[i, 0])
            if s.kl is not None:
                row_scores["KL"] = float(s.kl[i, 0])
            responses[m.name] = {"text": s.texts[i * k], "scores": row_scores}
        rows.append({"prompt": prompt_text(prompt.prompt), "responses": responses})
    return rows


def _write_samples(path: Path, prompts, models: list[_Model], samples: dict[str, M.ModelSamples],
                   scores: dict[str, M.ModelScores], k: int) -> None:
    with path.open("w", encoding="utf-8") as f:
        for m in models:
            s = scores[m.name]
            for i, prompt in enumerate(prompts):
                for j in range(k):
                    row = {"model": m.name, "id": prompt.id, "prompt": prompt.prompt, "sample": j,
                           "response": s.texts[i * k + j], "finished": bool(s.finished[i, j]),
                           "length": int(s.length[i, j]), "toxicity": float(s.toxicity[i, j])}
                    if s.reward is not None:
                        row["reward"] = float(s.reward[i, j])
                    if s.kl is not None:
                        row["kl"] = float(s.kl[i, j])
                    f.write(json.dumps(row) + "\n")


def _add_to_metrics_json(path: Path, extra: dict) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(extra)
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")

