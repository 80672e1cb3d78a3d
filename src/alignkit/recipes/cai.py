"""Constitutional AI (Bai et al. 2022): both phases, from red-team prompts and a constitution.

    alignkit cai --config configs/cai-tiny.yaml                  # seconds, a tiny random model
    alignkit cai --config configs/cai.yaml                       # built-in model, 20 red-team prompts
    alignkit cai --config configs/cai.yaml supervised.fine_tune=false    # only build the data sets
    alignkit cai --config configs/cai.yaml constitution=my_principles.yaml

Supervised phase (SL-CAI), for each red-team prompt:

1. the model answers;
2. for ``supervised.rounds`` rounds: a principle is drawn, the model critiques
   its answer under the principle's critique request, then rewrites it under the
   revision request; the revision becomes the answer;
3. (prompt, final revision) is an SFT example, with the whole chain kept beside it;
   a final answer that is empty or loops (``supervised.max_repetition``) is set
   aside in ``sft_dropped.jsonl`` instead: fine-tuning on a loop teaches the loop;
4. with ``supervised.fine_tune`` the model is fine-tuned on those examples by
   :func:`alignkit.recipes.sft.train_sft` (the same loop as ``alignkit sft``).

AI-feedback phase (RL-CAI's labels): the policy (the fine-tuned model, or
``feedback.policy``) answers each prompt twice; a judge model is asked which
answer better follows a drawn principle, as a multiple-choice question read in
log-probability mode (both orders, averaged: a soft label). The result is a
preference set for ``alignkit rm`` or ``alignkit dpo``.

Output ``runs/NAME/cai/``:

- ``final/sft.jsonl``: ``{"prompt", "completion", "initial_response", "chain":
  [{"round", "principle", "critique_request", "critique", "revision_request",
  "revision"}], "provenance"}`` (an SFT file for ``alignkit sft``);
- ``final/sft_dropped.jsonl``: the same records for answers left out, with the reason;
- ``final/chains.md``: every chain, to read;
- ``final/preferences.jsonl``: ``{"prompt", "chosen", "rejected", "soft_label",
  "principle", "provenance"}``; ``soft_label`` is the judge's P(chosen is better);
- ``sft/final/``: the fine-tuned model (with ``supervised.fine_tune``);
- ``final/summary.json``: counts and seconds per phase.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from alignkit.config import DataConfig, GenerationConfig, ModelConfig, RunConfig, TrainConfig, opt, to_dict
from alignkit.data.formats import PromptExample, SFTExample, load_prompts
from alignkit.data.io import read_text
from alignkit.errors import AlignkitError, ConfigError
from alignkit.judges import JudgeConfig, PairwiseJudge, build_judge
from alignkit.judges.judge import check_judge_config
from alignkit.runs import RunDir
from alignkit.training import Engine, SingleProcess

STAGE = "cai"
Messages = list[dict]


# --------------------------------------------------------------------------- config


@dataclass
class SupervisedConfig:
    rounds: int = opt(1, ge=1, help="critique -> revision rounds per prompt")
    fine_tune: bool = opt(True, help="fine-tune on the revisions; false: only write the data set")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=5e-5, batch_size=4, epochs=2.0))
    max_length: int = opt(512, ge=16, help="longest prompt + revision in tokens for fine-tuning")
    max_repetition: float = opt(0.5, ge=0, le=1, help="leave out of the SFT set a revision whose share of "
                                                      "repeated word 3-grams is above this (1: keep all)")


@dataclass
class FeedbackConfig:
    enabled: bool = True
    policy: str = opt("", help="the model that answers twice; empty: the fine-tuned model, else model.name")
    data: DataConfig = field(default_factory=lambda: DataConfig(path="", format="prompts"))  # empty path: `data`
    judge: JudgeConfig = field(default_factory=lambda: JudgeConfig(template="constitution", mode="logprob"))
    drop_inconsistent: bool = opt(False, help="drop pairs whose two orders disagree (logprob mode keeps them "
                                              "with their averaged, near-0.5 soft label)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    constitution: str = opt("default", help="a shipped constitution name or a YAML file")
    data: DataConfig = field(default_factory=lambda: DataConfig(path="builtin:prompts", format="prompts",
                                                                kind="red_team", limit=20))
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=128,
                                                                                  temperature=0.7))
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    run: RunConfig = field(default_factory=RunConfig)


# --------------------------------------------------------------------------- constitution


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str
    revision: str
    preference: str


def load_constitution(name: str) -> tuple[str, list[Principle]]:
    """(name, principles) from a shipped constitution (``default``) or a YAML file."""
    shipped = resources.files("alignkit").joinpath("constitutions", f"{name}.yaml")
    if "/" not in name and not name.endswith((".yaml", ".yml")) and shipped.is_file():
        text, source = shipped.read_text(encoding="utf-8"), f"alignkit/constitutions/{name}.yaml"
    else:
        if not Path(name).exists():
            raise AlignkitError(f"constitution '{name}': not a shipped constitution (default) and not a file")
        text, source = read_text(name, "constitution"), name
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise AlignkitError(f"{source}: invalid YAML: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("principles"), list) or not raw["principles"]:
        raise AlignkitError(f"{source}: field 'principles' must be a non-empty list of "
                            f"{{name, critique, revision, preference?}}")
    unknown = set(raw) - {"name", "description", "principles"}
    if unknown:
        raise AlignkitError(f"{source}: unknown field(s) {', '.join(sorted(map(str, unknown)))}; "
                            f"known: name, description, principles")
    principles = []
    for i, p in enumerate(raw["principles"]):
        where = f"{source}: principles[{i}]"
        if not isinstance(p, dict):
            raise AlignkitError(f"{where}: must be a mapping with critique and revision")
        unknown = set(p) - {"name", "critique", "revision", "preference"}
        if unknown:
            raise AlignkitError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        for key in ("critique", "revision"):
            if not isinstance(p.get(key), str) or not p[key].strip():
                raise AlignkitError(f"{where}: field '{key}' must be a non-empty text")
        if p.get("preference") is not None and (not isinstance(p["preference"], str) or not p["preference"].strip()):
            raise AlignkitError(f"{where}: field 'preference' must be a non-empty text (the question the "
                                f"feedback model answers), got {p['preference']!r}")
        pname = str(p.get("name") or f"principle-{i}")
        if pname in {q.name for q in principles}:  # the records name their principle: two alike are ambiguous
            raise AlignkitError(f"{where}: field 'name': '{pname}' is used twice")
        pref = p.get("preference") or f"Which of these assistant responses better follows the principle '{pname}'?"
        principles.append(Principle(pname, p["critique"].strip(), p["revision"].strip(), str(pref).strip()))
    return str(raw.get("name") or Path(source).stem), principles


# --------------------------------------------------------------------------- supervised phase

# Small models often label their rewrite ("Revised answer: ..."); the label is not part of the answer.
_LABEL = re.compile(r"^\s*(?:\*\*)?(?:here(?:'s| is) (?:the |a |my )?)?(?:new |revised |rewritten |updated )?"
                    r"(?:answer|response|version|revision)(?:\*\*)?\s*:\s*(?:\*\*)?\s*", re.IGNORECASE)


def clean_revision(text: str) -> str:
    """A revision without a leading label or wrapping quotes.

    >>> clean_revision('Revised answer: "Please be kind."')
    'Please be kind.'
    """
    text = _LABEL.sub("", text.strip(), count=1).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def critique_revise(model, tok, prompts: list[PromptExample], principles: list[Principle], rounds: int,
                    gen: GenerationConfig, seed: int, engine=None) -> list[dict]:
    """Answer, then critique and revise ``rounds`` times; one record (with its chain) per prompt."""
    from alignkit.rollout import generate

    engine = engine or SingleProcess()
    rng = random.Random(seed)
    convs = [p.prompt for p in prompts]
    bar, task = engine.progress(len(prompts) * (1 + 2 * rounds), "cai: answer, critique, revise")
    with bar:
        tick = lambda n: bar.update(task, advance=n)  # noqa: E731
        answers = [g.text for g in generate(model, tok, convs, gen, seed=seed, progress_cb=tick, engine=engine)]
        records = [{"initial_response": a, "chain": [], "current": a} for a in answers]
        for r in range(1, rounds + 1):
            drawn = [rng.choice(principles) for _ in prompts]
            # 1. critique the current answer under the drawn principle
            ask = [conv + [{"role": "assistant", "content": rec["current"]},
                           {"role": "user", "content": pr.critique}]
                   for conv, rec, pr in zip(convs, records, drawn)]
            critiques = [g.text for g in generate(model, tok, ask, gen, seed=seed + 2 * r - 1, progress_cb=tick,
                                                engine=engine)]
            # 2. revise in the light of the critique
            ask = [a + [{"role": "assistant", "content": c}, {"role": "user", "content": pr.revision}]
                   for a, c, pr in zip(ask, critiques, drawn)]
            revisions = [clean_revision(g.text)
                         for g in generate(model, tok, ask, gen, seed=seed + 2 * r, progress_cb=tick, engine=engine)]
            for rec, pr, c, v in zip(records, drawn, critiques, revisions):
                rec["chain"].append({"round": r, "principle": pr.name, "critique_request": pr.critique,
                                     "critique": c, "revision_request": pr.revision, "revision": v})
                if v:  # an empty revision keeps the previous answer (counted in the summary)
                    rec["current"] = v
    return records


def repetition(text: str) -> float:
    """Share of a text's word 3-grams that repeat an earlier one: 0 for fresh text, near 1 for a loop.

    Small models often fall into loops ("lazy, lazy, lazy, ..."); fine-tuning on a
    looping revision would teach the loop, not the principle.

    >>> repetition("be kind to him"), round(repetition("no no no no no no"), 2)
    (0.0, 0.75)
    """
    from alignkit.eval.stats import distinct_n

    if len(text.split()) < 3:
        return 0.0
    return 1.0 - distinct_n([text], 3)


def write_sft_set(folder: Path, prompts: list[PromptExample], records: list[dict], max_repetition: float,
                  provenance: dict, write: bool = True) -> tuple[list[SFTExample], int, int]:
    """sft.jsonl (+ sft_dropped.jsonl for empty or looping answers); returns (examples, empty revisions, dropped).

    ``write=False`` (processes other than the main one) returns the same without writing.
    """
    examples, n_empty, dropped = [], 0, 0
    sink = lambda name: (folder / name).open("w") if write else open(os.devnull, "w")  # noqa: E731
    with sink("sft.jsonl") as f, sink("sft_dropped.jsonl") as d:
        for p, rec in zip(prompts, records):
            n_empty += sum(not step["revision"] for step in rec["chain"])
            row = {"prompt": p.prompt, "completion": rec["current"], "initial_response": rec["initial_response"],
                   "chain": rec["chain"], "provenance": {**provenance, "prompt_id": p.id}}
            rep = repetition(rec["current"])
            if not rec["current"].strip() or rep > max_repetition:
                dropped += 1
                reason = "empty" if not rec["current"].strip() else f"repetition {rep:.2f} > {max_repetition}"
                d.write(json.dumps({**row, "dropped": reason}) + "\n")
                continue
            f.write(json.dumps(row) + "\n")
            examples.append(SFTExample(p.prompt, rec["current"], f"{folder / 'sft.jsonl'}:{p.id}"))
    return examples, n_empty, dropped


def write_chains_md(path: Path, prompts: list[PromptExample], records: list[dict]) -> None:
    lines = ["# Constitutional AI: critique and revision chains", ""]
    for p, rec in zip(prompts, records):
        lines += [f"## {p.id or p.loc}", "", f"**Prompt:** {p.prompt[-1]['content']}", "",
                  f"**Initial answer:** {rec['initial_response']}", ""]
        for step in rec["chain"]:
            lines += [f"**Round {step['round']}, principle `{step['principle']}`**", "",
                      f"- *Critique request:* {step['critique_request']}", f"- *Critique:* {step['critique']}",
                      f"- *Revision request:* {step['revision_request']}", f"- *Revision:* {step['revision']}", ""]
        lines += [f"**Final answer (SFT target):** {rec['current']}", "", "---", ""]
    path.write_text("\n".join(lines))


# --------------------------------------------------------------------------- the recipe


def _sft_config(cfg: Config):
    from alignkit.recipes import sft

    return sft.Config(model=cfg.model, data=DataConfig(format="sft", max_length=cfg.supervised.max_length,
                                                       on_error="skip"),
                      train=cfg.supervised.train, run=cfg.run)


def check_config(cfg: Config) -> None:
    """Cross-field rules the per-field ranges cannot express."""
    if cfg.feedback.enabled and not cfg.generation.do_sample:
        # phase 2 compares two answers to each prompt: greedy decoding gives the same one twice
        raise ConfigError("cai's feedback phase compares two sampled answers per prompt: generation.do_sample=false "
                          "gives the same answer twice; set generation.do_sample=true (or feedback.enabled=false)")


def main(cfg: Config, resume: bool = False) -> Path:
    from alignkit.data.collate import encode_prompts
    from alignkit.models import load_causal_lm, load_tokenizer, model_context

    check_config(cfg)
    run = RunDir(cfg.run.output_dir, cfg.run.name, STAGE)
    if resume and run.is_done() and (run.final / "sft.jsonl").exists():
        print(f"alignkit cai: {run.final} is already complete")
        return run.final

    # -- setup: constitution, prompts, the model; the feedback judge's settings are checked now,
    #    not after the supervised phase has run
    const_name, principles = load_constitution(cfg.constitution)
    if cfg.feedback.enabled and check_judge_config(cfg.feedback.judge).kind != "pairwise":
        raise ConfigError(f"feedback.judge.template '{cfg.feedback.judge.template}' is a scalar template; "
                          f"the feedback phase needs a pairwise one (constitution, pairwise)")
    if not cfg.data.path:
        raise ConfigError("data.path is empty: give red-team prompts (a file, a hub dataset or builtin:prompts)")
    prompts = load_prompts(cfg.data.path, cfg.data.split, cfg.data.on_error, cfg.data.kind, cfg.data.limit,
                           fmt=cfg.data.format)
    engine = Engine(seed=cfg.run.seed)  # placement and prompt sharding; the fine-tuning gets its own
    if engine.is_main:
        run.write_config(cfg)
        run.final.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(cfg.model.name, cfg.model.cache_dir)
    model = engine.place(load_causal_lm(cfg.model, trainable=cfg.supervised.fine_tune, tokenizer=tok))
    # The conversation grows by an answer, then a critique request, a critique, a revision request
    # and a revision per round: what must fit after the prompt, checked before any of it is sampled.
    requests = max(len(tok(p.critique)["input_ids"]) + len(tok(p.revision)["input_ids"]) for p in principles)
    grows = cfg.generation.max_new_tokens * (1 + 2 * cfg.supervised.rounds) + cfg.supervised.rounds * (requests + 32)
    prompts, _ = encode_prompts(tok, prompts, cfg.data.max_prompt_length, cfg.data.on_error,
                                context=model_context(model), max_new_tokens=grows)
    if not prompts:
        raise AlignkitError(f"{cfg.data.path}: every prompt was skipped (see the warning above)")
    seconds: dict[str, float] = {}
    summary: dict = {"constitution": const_name, "prompts": len(prompts)}
    base_prov = {"stage": STAGE, "model": cfg.model.name, "constitution": const_name, "seed": cfg.run.seed,
                 "generation": to_dict(cfg.generation)}

    # 1. supervised phase: answer -> (critique -> revision) x rounds
    t0 = time.time()
    records = critique_revise(model, tok, prompts, principles, cfg.supervised.rounds, cfg.generation, cfg.run.seed,
                              engine)
    # 2. the SFT set: (prompt, final revision); empty or looping ones go to sft_dropped.jsonl
    examples, n_empty, dropped = write_sft_set(run.final, prompts, records, cfg.supervised.max_repetition,
                                               {**base_prov, "rounds": cfg.supervised.rounds}, write=engine.is_main)
    if engine.is_main:
        write_chains_md(run.final / "chains.md", prompts, records)
    summary.update(sft_examples=len(examples), sft_dropped=dropped, empty_revisions=n_empty,
                   unchanged=sum(r["current"] == r["initial_response"] for r in records))
    seconds["critique_revise"] = time.time() - t0
    engine.print(f"alignkit cai: {len(examples)} revised answers -> {run.final / 'sft.jsonl'} ({n_empty} empty revisions "
          f"kept the previous answer; {dropped} empty or looping final answers -> sft_dropped.jsonl)")

    # 3. fine-tune on the revisions (the same SFT loop as `alignkit sft`)
    in_memory = cfg.model.name  # what the weights in `model` are, as a model name
    if cfg.supervised.fine_tune:
        if not examples:
            raise AlignkitError("cai: every final revision is empty or looping (see sft_dropped.jsonl); "
                                "nothing to fine-tune on")
        from alignkit.recipes.sft import train_sft

        t0 = time.time()
        sft_final = train_sft(_sft_config(cfg), examples, run.path / "sft", resume=resume, model=model, tokenizer=tok)
        seconds["fine_tune"] = time.time() - t0
        summary["sft_model"] = in_memory = str(sft_final)

    # 4. AI feedback: two answers per prompt, the judge picks under a drawn principle
    if cfg.feedback.enabled:
        t0 = time.time()
        summary.update(feedback(cfg, run, prompts, principles, model, tok, in_memory, base_prov, engine))
        seconds["feedback"] = time.time() - t0

    summary["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    if engine.is_main:
        (run.final / "summary.json").write_text(json.dumps(summary, indent=2))
    engine.finish(run, summary)
    engine.print(f"alignkit cai: done in {sum(seconds.values()):.0f} s -> {run.final}")
    return run.final


def feedback(cfg: Config, run: RunDir, prompts: list[PromptExample], principles: list[Principle], model, tok,
             in_memory: str, base_prov: dict, engine: Engine) -> dict:
    """Write preferences.jsonl: the judge's soft preference between two answers per prompt.

    Every process samples its share of the answers; the main process judges and writes.
    """
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.rollout import generate

    fb = cfg.feedback
    if fb.data.path:
        prompts = load_prompts(fb.data.path, fb.data.split, fb.data.on_error, fb.data.kind, fb.data.limit,
                               fmt=fb.data.format, setting="feedback.data.format")
    # The policy: the model in memory (just fine-tuned, or not), or another one by name.
    policy_name = fb.policy or in_memory
    if policy_name != in_memory:
        pcfg = ModelConfig(name=policy_name, dtype=cfg.model.dtype, cache_dir=cfg.model.cache_dir)
        tok = load_tokenizer(pcfg.name, pcfg.cache_dir)
        model = engine.place(load_causal_lm(pcfg, trainable=False, tokenizer=tok))
    model.eval()
    bar, task = engine.progress(len(prompts) * 2, "cai: two answers per prompt")
    with bar:
        gens = generate(model, tok, [p.prompt for p in prompts], cfg.generation, n=2, seed=cfg.run.seed + 1000,
                        progress_cb=lambda n: bar.update(task, advance=n), engine=engine)
    if not engine.is_main:
        engine.wait()
        return {}

    # The judge: shares the weights in memory when it is the same, untouched model.
    jcfg = fb.judge
    shared = jcfg.backend == "local" and jcfg.model.name == policy_name
    judge = build_judge(jcfg, model=model if shared else None, tokenizer=tok if shared else None,
                        device=engine.device)
    if not isinstance(judge, PairwiseJudge):
        raise ConfigError(f"feedback.judge.template '{jcfg.template}' is a scalar template; "
                          f"the feedback phase needs a pairwise one (constitution, pairwise)")
    rng = random.Random(cfg.run.seed + 1)
    todo, skipped = [], 0
    for i, p in enumerate(prompts):
        a, b = gens[2 * i].text.strip(), gens[2 * i + 1].text.strip()
        if not a or not b or a == b:  # no preference to learn between identical or empty answers
            skipped += 1
            continue
        todo.append((p, a, b, rng.choice(principles)))
    verdicts = judge.compare([t[0].prompt for t in todo], [t[1] for t in todo], [t[2] for t in todo],
                             guidelines=[t[3].preference for t in todo]) if todo else []
    kept = ties = 0
    with (run.final / "preferences.jsonl").open("w") as f:
        for (p, a, b, pr), v in zip(todo, verdicts):
            if v.winner == "tie" or (fb.drop_inconsistent and not v.consistent):
                ties += 1
                continue
            chosen, rejected, soft = (a, b, v.p_a) if v.winner == "A" else (b, a, 1 - v.p_a)
            f.write(json.dumps({"prompt": p.prompt, "chosen": chosen, "rejected": rejected, "soft_label": soft,
                                "principle": pr.name,
                                "provenance": {**base_prov, "policy": policy_name, "judge": judge.backend.id,
                                               "template": jcfg.template, "mode": jcfg.mode,
                                               "question": pr.preference, "consistent": v.consistent,
                                               "option_mass": v.mass, "prompt_id": p.id}}) + "\n")
            kept += 1
    print(f"alignkit cai: {kept} AI preference pairs -> {run.final / 'preferences.jsonl'} "
          f"({ties} ties{' or inconsistent' if fb.drop_inconsistent else ''}, {skipped} prompts with identical or empty answers); judge: {judge.stats.summary('comparisons')}")
    warning = judge.stats.warning("comparison", "counted as a tie", "the preferences say little about the answers")
    if warning:  # the main process judged every pair: its counts are the whole run's
        print(f"alignkit cai: warning: {warning}")
    engine.wait()
    return {"preference_pairs": kept, "preference_ties": ties, "preference_skipped": skipped,
            "judge": judge.stats.as_dict()}
