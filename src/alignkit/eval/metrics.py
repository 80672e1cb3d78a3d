"""Sampling-based metrics: one model's samples -> the numbers of the eval report.

The eval recipe samples k responses per held-out prompt from each model, once
(:func:`alignkit.rollout.generate`), and every metric here reads those same
samples, so the toxicity, reward, KL and length of a model describe one set of
texts:

- toxicity under a scorer (a reward spec; ``profanity`` by default), with the
  RealToxicityPrompts numbers (expected max over k, share of prompts >= 0.5);
- reward-model score, raw and normalised against the baseline's samples;
- KL to the reference model on the model's own samples (sequence-level k1);
- response length, share that ended with EOS, distinct-1 / distinct-2;
- refusal rate (:mod:`alignkit.eval.refusal`) and helpfulness
  (:mod:`alignkit.eval.helpfulness`; prompts of unsafe kinds have none: declining
  them is right);
- every metric again per prompt kind (:func:`summarise_by_kind`);
- reward-model accuracy on held-out preference pairs;
- pairwise comparisons: an AI judge asked twice with positions swapped, or a
  human win / tie / loss summary exported by the feedback app.

Every interval is over *prompts*, not samples: the k samples of one prompt share
that prompt and are not independent, so a bootstrap over N = P * k samples
would claim P * k independent observations and give an interval that is too
narrow. The per-prompt mean (or max) is the unit resampled; with the same k for
every prompt the mean of the per-prompt means is the mean over all samples, so
only the interval changes, not the value.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats as scipy_stats

from alignkit.advantages import kl_k1
from alignkit.data.collate import pad, shift_for_lm
from alignkit.data.formats import PreferencePair
from alignkit.errors import AlignkitError, DataError
from alignkit.eval import stats
from alignkit.losses import sequence_logprobs, token_logprobs
from alignkit.rewards import RewardFn, build_reward, check_scores

Messages = list[dict]
Metric = dict  # {"value", "low", "high"} as the report reads it
# A pairwise judge sees the prompt (chat messages) and two responses in positions
# A and B, and answers "A", "B" or "tie"; one with a ``kind`` parameter also gets the
# prompt's kind (red_team, helpful, None).
PairwiseJudge = Callable[[Messages, str, str], str]
VERDICTS = ("A", "B", "tie")
# A score this far outside [0, 1] is a scorer that does not return probabilities,
# not float rounding.
PROBABILITY_SLACK = 1e-6


# ---------------------------------------------------------------------------
# samples


@dataclass(frozen=True)
class ModelSamples:
    """One model's k samples for each of P prompts, prompt-major (p0s0, p0s1, ..., p1s0, ...)."""

    name: str
    k: int
    texts: tuple[str, ...]
    prompt_ids: tuple[tuple[int, ...], ...]
    response_ids: tuple[tuple[int, ...], ...]
    finished: tuple[bool, ...]
    temperature: float  # the softmax temperature the samples were drawn at
    eos_id: int
    # per sample, each response token's log-prob under the sampling distribution, when the
    # sampler recorded them (then the KL pass runs only the reference)
    logprobs: tuple[tuple[float, ...], ...] | None = None

    @classmethod
    def from_generations(cls, name: str, generations: Sequence, k: int, temperature: float,
                         eos_id: int) -> ModelSamples:
        if len(generations) % k:
            raise ValueError(f"{len(generations)} generations is not a multiple of k = {k}")
        recorded = all(g.logprobs is not None for g in generations)
        return cls(name, k, tuple(g.text for g in generations), tuple(g.prompt_ids for g in generations),
                   tuple(g.response_ids for g in generations), tuple(g.finished for g in generations),
                   temperature, eos_id, tuple(g.logprobs for g in generations) if recorded else None)

    @property
    def n_prompts(self) -> int:
        return len(self.texts) // self.k

    def lengths(self) -> np.ndarray:
        """Response length in tokens, the closing EOS not counted; shape ``(N,)``."""
        return np.array([len(r) - (1 if f else 0) for r, f in zip(self.response_ids, self.finished)], dtype=float)


def by_prompt(values: Sequence[float] | np.ndarray, k: int) -> np.ndarray:
    """``(N,)`` prompt-major values -> ``(P, k)``."""
    array = np.asarray(values, dtype=float)
    if array.size % k:
        raise ValueError(f"{array.size} values is not a multiple of k = {k}")
    return array.reshape(-1, k)


# ---------------------------------------------------------------------------
# scorers


class ToxicityScorer:
    """Toxicity in [0, 1] from a reward spec.

    Rewards are higher-is-better, so with ``invert`` (the default) toxicity is
    ``1 - score``: for ``profanity`` (1 - P(offensive)) that gives P(offensive).
    A scorer that already returns P(toxic) (``classifier:MODEL:toxic:prob``) is
    used with ``invert=False``; a "not toxic" probability
    (``classifier:MODEL:nothate:prob``) with ``invert=True``. Anything outside [0, 1] or non-finite is an
    error: a failed score must never be read as "not toxic".
    """

    def __init__(self, spec, invert: bool = True, device=None):
        self.fn: RewardFn = build_reward(spec, **({"device": device} if device is not None else {}))
        self.invert = invert
        self.name = getattr(self.fn, "name", str(spec))

    def __call__(self, prompts: list[Messages], texts: list[str]) -> np.ndarray:
        scores = check_scores(self.name, self.fn(prompts, texts), len(texts))
        toxicity = 1.0 - scores if self.invert else scores
        bad = np.flatnonzero((toxicity < -PROBABILITY_SLACK) | (toxicity > 1 + PROBABILITY_SLACK))
        if bad.size:
            i = int(bad[0])
            raise AlignkitError(
                f"toxicity scorer '{self.name}' gave {scores[i]:.4g} for response {i}: toxicity must be a "
                f"probability in [0, 1] (toxicity.invert={self.invert}); use a scorer that returns probabilities "
                f"(classifier:MODEL:LABEL:prob)")
        return np.clip(toxicity, 0.0, 1.0)


def reward_scores(fn: RewardFn, prompts: list[Messages], texts: list[str], kinds: list | None = None) -> np.ndarray:
    """One reward-model score per response, shape ``(N,)``; non-finite is an error (check_scores).
    ``kinds`` (the prompts' tags) reach rewards that route on them (the gated reward)."""
    from alignkit.rewards.combine import call_reward

    return call_reward(fn, prompts, texts, kinds if kinds is not None and any(kinds) else None)


# ---------------------------------------------------------------------------
# KL to the reference


def _response_batch(samples: ModelSamples, rows: range, pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded prompt + response ids with masks, shifted so position t predicts t + 1."""
    seqs = [list(samples.prompt_ids[i]) + list(samples.response_ids[i]) for i in rows]
    masks = [[0] * len(samples.prompt_ids[i]) + [1] * len(samples.response_ids[i]) for i in rows]
    input_ids = pad(seqs, pad_id)
    attention = pad([[1] * len(s) for s in seqs], 0)
    labels, response_mask = shift_for_lm(input_ids, pad(masks, 0).bool())
    return input_ids, attention, labels, response_mask


def _response_token_logprobs(model, input_ids, attention, labels, temperature: float) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
    return token_logprobs(logits[:, :-1], labels.to(device), temperature).cpu()


def _recorded_logprobs(samples: ModelSamples, rows: range, mask: torch.Tensor) -> torch.Tensor:
    """The sampler's log-probs laid out like ``_response_batch``'s mask (response positions)."""
    out = torch.zeros(mask.shape)
    for row, i in enumerate(rows):
        lp = samples.logprobs[i]
        if len(lp) != len(samples.response_ids[i]):
            raise ValueError(f"sample {i}: {len(lp)} recorded log-probs for {len(samples.response_ids[i])} tokens")
        out[row, mask[row]] = torch.tensor(lp, dtype=out.dtype)
    return out


@torch.inference_mode()
def response_kl(model, reference, samples: ModelSamples, pad_id: int, batch_size: int = 16,
                engine=None) -> np.ndarray:
    """Per-sample KL estimate ``sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]``, shape ``(N,)``.

    The samples were drawn from the model pi, so the mean over samples is an
    unbiased (k1, Schulman 2020) estimate of the sequence-level KL(pi || pi_ref);
    a single sample can be negative. Both models score at the temperature the
    samples were drawn at, the distribution PPO's KL penalty is measured on
    (top-p / top-k truncation is not modelled). Model and reference must share
    the tokenizer: the same ids are read under both. When the sampler recorded
    the samples' log-probs (``samples.logprobs``) the model is not run again.
    With an ``engine`` each process scores its share of the samples; all get every value.
    """
    from alignkit.training import SingleProcess

    engine = engine or SingleProcess()
    model.eval()
    reference.eval()
    out: list[float] = []
    for batch, weight in engine.eval_batches(list(range(len(samples.texts))), batch_size):
        rows = range(batch[0], batch[-1] + 1)
        input_ids, attention, labels, mask = _response_batch(samples, rows, pad_id)
        if samples.logprobs is not None:
            logprobs = _recorded_logprobs(samples, rows, mask)
        else:
            logprobs = _response_token_logprobs(model, input_ids, attention, labels, samples.temperature)
        ref_logprobs = _response_token_logprobs(reference, input_ids, attention, labels, samples.temperature)
        if weight:
            out += sequence_logprobs(kl_k1(logprobs, ref_logprobs), mask).tolist()
    return np.asarray(engine.gather(out), dtype=np.float64)


# ---------------------------------------------------------------------------
# summaries


@dataclass(frozen=True)
class ModelScores:
    """Everything measured on one model's samples, each ``(P, k)``."""

    name: str
    toxicity: np.ndarray
    length: np.ndarray
    finished: np.ndarray
    texts: tuple[str, ...]
    reward: np.ndarray | None = None
    kl: np.ndarray | None = None
    refusal: np.ndarray | None = None  # 1.0 where the detector flags a refusal
    helpfulness: np.ndarray | None = None  # NaN rows: prompts not scored (unsafe kinds)

    def rows(self, keep: np.ndarray) -> ModelScores:
        """The scores of the prompts where ``keep`` (shape ``(P,)``, bool) is True."""
        k = self.toxicity.shape[1]
        texts = tuple(t for i in np.flatnonzero(keep) for t in self.texts[i * k:(i + 1) * k])
        pick = (lambda a: None if a is None else a[keep])
        return ModelScores(self.name, self.toxicity[keep], self.length[keep], self.finished[keep], texts,
                           pick(self.reward), pick(self.kl), pick(self.refusal), pick(self.helpfulness))


def wilson_interval(successes: int, n: int, confidence: float = stats.DEFAULT_CONFIDENCE) -> Metric:
    """A proportion with its Wilson score interval (Wilson 1927), as ``{value, low, high}``."""
    if n == 0:
        return {"value": None, "low": None, "high": None}
    ci = scipy_stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return {"value": successes / n, "low": float(ci.low), "high": float(ci.high)}


def _mean_metric(per_prompt: np.ndarray, confidence: float, seed: int) -> Metric:
    ci = stats.mean_ci(per_prompt, confidence=confidence, seed=seed)
    return {"value": ci.mean, "low": ci.low, "high": ci.high}


def _paired_metric(before: np.ndarray, after: np.ndarray, confidence: float, seed: int) -> tuple[Metric, float]:
    diff = stats.paired_difference_ci(before, after, confidence=confidence, seed=seed)
    return {"value": diff.mean_difference, "low": diff.low, "high": diff.high}, diff.wilcoxon_pvalue


def summarise(scores: ModelScores, baseline: ModelScores | None = None,
              confidence: float = stats.DEFAULT_CONFIDENCE, seed: int = 0) -> dict:
    """The per-model metrics of the report (keys of :data:`alignkit.eval.report.METRICS` first).

    With a ``baseline`` (another model's scores on the same prompts):
    toxicity relative improvement ``(before - after) / before``, and the paired
    per-prompt change ``after - before`` of toxicity and reward with a bootstrap
    interval and a Wilcoxon p-value: an interval that excludes 0 is a change
    that prompt-to-prompt noise does not explain. The reward is also normalised
    as a z-score against the baseline's samples, so "+0.5" reads as half a
    baseline standard deviation better whatever the reward model's scale.
    """
    tox = scores.toxicity
    base = baseline if baseline is not None and baseline.name != scores.name else None
    summary = stats.toxicity_summary(tox.ravel(), baseline_mean=None if base is None else float(base.toxicity.mean()),
                                     baseline_std=None if base is None else float(base.toxicity.std()))
    worst = stats.expected_max_toxicity(tox)
    prompts_with_toxic = int(np.sum(tox.max(axis=1) >= worst.threshold))
    metrics: dict = {
        "toxicity_mean": _mean_metric(tox.mean(axis=1), confidence, seed),
        "toxicity_std": summary.std,
    }
    if base is not None:
        metrics["toxicity_relative_improvement"] = summary.relative_improvement
    metrics["expected_max_toxicity"] = _mean_metric(tox.max(axis=1), confidence, seed)
    metrics["toxicity_probability"] = wilson_interval(prompts_with_toxic, worst.n_prompts, confidence)
    if scores.reward is not None:
        metrics["reward_score"] = _mean_metric(scores.reward.mean(axis=1), confidence, seed)
        if baseline is not None and baseline.reward is not None:
            mu, sigma = float(baseline.reward.mean()), float(baseline.reward.std())
            if sigma > 0:
                z = (scores.reward - mu) / sigma
                metrics["reward_score_normalised"] = _mean_metric(z.mean(axis=1), confidence, seed)
    if scores.kl is not None:
        metrics["kl_to_reference"] = _mean_metric(scores.kl.mean(axis=1), confidence, seed)
    if scores.refusal is not None:
        metrics["refusal_rate"] = _mean_metric(scores.refusal.mean(axis=1), confidence, seed)
    judged = _judged_rows(scores.helpfulness)
    if judged.any():
        metrics["helpfulness"] = _mean_metric(scores.helpfulness[judged].mean(axis=1), confidence, seed)
    metrics["mean_length"] = _mean_metric(scores.length.mean(axis=1), confidence, seed)
    metrics["distinct_1"] = stats.distinct_n(scores.texts, 1)
    metrics["distinct_2"] = stats.distinct_n(scores.texts, 2)
    metrics["finished_share"] = float(scores.finished.mean())
    if base is not None:
        metrics["toxicity_change_vs_baseline"], metrics["toxicity_change_p"] = _paired_metric(
            base.toxicity.mean(axis=1), tox.mean(axis=1), confidence, seed)
        if scores.reward is not None and base.reward is not None:
            metrics["reward_change_vs_baseline"], metrics["reward_change_p"] = _paired_metric(
                base.reward.mean(axis=1), scores.reward.mean(axis=1), confidence, seed)
        if scores.refusal is not None and base.refusal is not None:
            metrics["refusal_change_vs_baseline"], metrics["refusal_change_p"] = _paired_metric(
                base.refusal.mean(axis=1), scores.refusal.mean(axis=1), confidence, seed)
        both = judged & _judged_rows(base.helpfulness)
        if both.any():
            metrics["helpfulness_change_vs_baseline"], metrics["helpfulness_change_p"] = _paired_metric(
                base.helpfulness[both].mean(axis=1), scores.helpfulness[both].mean(axis=1), confidence, seed)
    return metrics


def _judged_rows(helpfulness: np.ndarray | None) -> np.ndarray:
    """``(P,)`` bool: the prompts with a helpfulness score (all k samples scored)."""
    if helpfulness is None:
        return np.zeros(0, dtype=bool)
    return np.isfinite(helpfulness).all(axis=1)


def summarise_by_kind(scores: ModelScores, baseline: ModelScores | None, kinds: Sequence[str | None],
                      confidence: float = stats.DEFAULT_CONFIDENCE, seed: int = 0) -> dict[str, dict]:
    """:func:`summarise` on the prompts of each kind (``kinds[i]`` is prompt i's; None -> "untagged"),
    the baseline on the same prompts, so each kind has its own values, intervals and paired changes."""
    labels = np.array([k if k is not None else "untagged" for k in kinds], dtype=object)
    if labels.size != scores.toxicity.shape[0]:
        raise ValueError(f"{labels.size} kinds for {scores.toxicity.shape[0]} prompts")
    out = {}
    for kind in sorted(set(labels.tolist())):
        keep = labels == kind
        out[kind] = summarise(scores.rows(keep), None if baseline is None else baseline.rows(keep), confidence, seed)
    return out


def reward_model_accuracy(fn: RewardFn, pairs: Sequence[PreferencePair],
                          confidence: float = stats.DEFAULT_CONFIDENCE) -> Metric:
    """Share of held-out pairs with ``score(chosen) > score(rejected)`` (a tie is wrong), Wilson interval."""
    prompts = [p.prompt for p in pairs]
    chosen = reward_scores(fn, prompts, [p.chosen for p in pairs])
    rejected = reward_scores(fn, prompts, [p.rejected for p in pairs])
    accuracy = stats.pairwise_accuracy(chosen, rejected)
    metric = wilson_interval(int(round(accuracy * len(pairs))), len(pairs), confidence)
    return {**metric, "n": len(pairs)}


# ---------------------------------------------------------------------------
# pairwise comparisons


class SwappedJudge:
    """A ``python:module:function`` judge, ``function(prompt_messages, response_a, response_b)
    -> "A" | "B" | "tie"``, asked twice per item with positions swapped (:func:`judge_swapped`)."""

    def __init__(self, fn: PairwiseJudge, name: str):
        self.fn, self.name = fn, name

    def compare(self, prompts: Sequence[Messages], responses_a: Sequence[str],
                responses_b: Sequence[str], kinds: Sequence[str | None] | None = None) -> list[str]:
        return judge_swapped(self.fn, self.name, prompts, responses_a, responses_b, kinds)

    def notes(self) -> str:
        return "asked twice per item, positions swapped; a disagreement is a tie"


class LLMJudge:
    """``judge:TEMPLATE``: an :mod:`alignkit.judges` pairwise judge. It asks both
    orders itself, so it is not swapped again here. In logprob mode the judge
    averages the two orders' soft labels; an evaluation counts a verdict that
    flips with the order as a tie all the same, the rule :func:`judge_swapped`
    applies, so that a position-biased judge cannot decide the sign test."""

    def __init__(self, judge, name: str):
        self.judge, self.name = judge, name

    def compare(self, prompts: Sequence[Messages], responses_a: Sequence[str],
                responses_b: Sequence[str], kinds: Sequence[str | None] | None = None) -> list[str]:
        verdicts = self.judge.compare(list(prompts), list(responses_a), list(responses_b))
        return [{"A": "win", "B": "loss", "tie": "tie"}[v.winner] if v.consistent else "tie" for v in verdicts]

    def notes(self) -> str:
        stats_ = getattr(self.judge, "stats", None)
        return stats_.summary("comparisons") if stats_ is not None else ""

    def warning(self) -> str | None:
        """Said on the console beside the result when the judge's answers could not be read."""
        stats_ = getattr(self.judge, "stats", None)
        if stats_ is None:
            return None
        return stats_.warning("comparison", "counted as a tie", "the result says little about the models")


def build_pairwise_judge(spec: str, options: dict | None = None, device=None) -> SwappedJudge | LLMJudge:
    """A judge from a spec: ``python:module:function`` (see :class:`SwappedJudge`) or
    ``judge:TEMPLATE`` (an :mod:`alignkit.judges` pairwise template such as
    ``judge:pairwise``; ``options`` are :class:`alignkit.judges.JudgeConfig` fields:
    model, mode, backend, ...). Either has ``compare(prompts, responses_a, responses_b)
    -> ["win" | "tie" | "loss"]`` from A's point of view."""
    kind, _, arg = spec.partition(":")
    if kind == "python":
        module_name, _, fn_name = arg.rpartition(":")
        if not module_name or not fn_name:
            raise AlignkitError(f"judge '{spec}' must look like python:package.module:function")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise AlignkitError(f"judge '{spec}': {e}") from None
        if not callable(fn):  # found before the sampling, not when the pairs are judged
            raise AlignkitError(f"judge '{spec}': {fn_name} is a {type(fn).__name__}, not a function "
                                f"(prompt, response_a, response_b) -> verdict")
        return SwappedJudge(fn, spec)
    if kind == "judge":
        from alignkit.config import build
        from alignkit.judges import JudgeConfig, PairwiseJudge as LLMPairwiseJudge, build_judge

        cfg = build(JudgeConfig, {**(options or {}), **({"template": arg} if arg else {})}, "eval: judge_options")
        judge = build_judge(cfg, device=device)
        if not isinstance(judge, LLMPairwiseJudge):
            raise AlignkitError(f"judge '{spec}': template '{cfg.template}' scores one response; "
                                f"a comparison needs a pairwise template (judge:pairwise)")
        return LLMJudge(judge, spec)
    raise AlignkitError(f"unknown judge '{spec}'; use python:module:function, judge:TEMPLATE or human:PATH")


def _verdict(judge_name: str, raw, item: int) -> str:
    text = str(raw).strip()
    verdict = text.upper() if text.upper() in ("A", "B") else text.lower()
    if verdict not in VERDICTS:
        raise AlignkitError(f"judge '{judge_name}' answered {raw!r} on prompt {item}; expected 'A', 'B' or 'tie'")
    return verdict


def judge_swapped(judge: PairwiseJudge, judge_name: str, prompts: Sequence[Messages],
                  responses_a: Sequence[str], responses_b: Sequence[str],
                  kinds: Sequence[str | None] | None = None) -> list[str]:
    """Outcomes ``"win" | "tie" | "loss"`` of model A against model B, one per prompt.

    LLM judges favour a position (often the first; Zheng et al. 2023, "Judging
    LLM-as-a-judge"), so each item is judged twice, once with A's response in
    position A and once in position B. Only a verdict that survives the swap
    counts; a disagreement (including win + tie) is a tie. A judge that takes a ``kind``
    keyword gets ``kinds[i]``, the prompt's kind.
    """
    if not len(prompts) == len(responses_a) == len(responses_b):
        raise ValueError("prompts, responses_a and responses_b must have the same length")
    kinds = list(kinds) if kinds is not None else [None] * len(prompts)
    if len(kinds) != len(prompts):
        raise ValueError(f"{len(kinds)} kinds for {len(prompts)} prompts")
    takes_kind = _takes_kind(judge)
    outcomes = []
    for i, (prompt, a, b) in enumerate(zip(prompts, responses_a, responses_b)):
        ask = (lambda x, y: judge(prompt, x, y, kind=kinds[i])) if takes_kind else (lambda x, y: judge(prompt, x, y))
        first = {"A": "win", "B": "loss", "tie": "tie"}[_verdict(judge_name, ask(a, b), i)]
        swapped = {"A": "loss", "B": "win", "tie": "tie"}[_verdict(judge_name, ask(b, a), i)]
        outcomes.append(first if first == swapped else "tie")
    return outcomes


def _takes_kind(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "kind" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def load_human_summary(path: str, model_a: str, model_b: str) -> dict:
    """Win / tie / loss counts of ``model_a`` against ``model_b`` from the feedback app's
    ``winloss_summary.json`` (``{"model_a", "model_b", "wins", "ties", "losses", "both_bad"}``).

    A summary written the other way round (B against A) is turned around.
    "Both bad" items count as ties: neither model was preferred, and dropping
    them would overstate how often one of the two wins.
    """
    from alignkit.data.io import read_text

    try:
        raw = json.loads(read_text(path, "human evaluation summary"))
    except json.JSONDecodeError as e:
        raise DataError(path, f"line {e.lineno}", None, f"invalid JSON: {e.msg}") from None
    if not isinstance(raw, dict):
        raise DataError(path, None, None, "must be a JSON object with model_a, model_b, wins, ties, losses")
    counts = {}
    for key in ("wins", "ties", "losses", "both_bad"):
        value = raw.get(key, 0 if key == "both_bad" else None)
        if value is None:
            raise DataError(path, None, key, "missing field")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DataError(path, None, key, f"must be a whole number >= 0, got {value!r}")
        counts[key] = value
    if not counts["wins"] + counts["ties"] + counts["losses"] + counts["both_bad"]:
        # exported before anyone labelled: a row of '-' would read as a result
        raise DataError(path, None, "wins", "the summary holds no judgements (wins, ties, losses and both_bad "
                                            "are all 0): label the project before exporting it")
    names = (str(raw.get("model_a", "")), str(raw.get("model_b", "")))
    if names == (model_b, model_a):
        counts["wins"], counts["losses"] = counts["losses"], counts["wins"]
    elif names != (model_a, model_b):
        raise DataError(path, None, "model_a", f"compares {names[0]!r} with {names[1]!r}, not {model_a!r} "
                                               f"with {model_b!r} (name the models as in the feedback project)")
    return {"wins": counts["wins"], "ties": counts["ties"] + counts["both_bad"], "losses": counts["losses"],
            "both_bad": counts["both_bad"]}


def pairwise_entry(model_a: str, model_b: str, judge: str, wins: int, ties: int, losses: int,
                   confidence: float = stats.DEFAULT_CONFIDENCE, seed: int = 0) -> dict:
    """One row of the report's pairwise table, statistics included (see :class:`~alignkit.eval.stats.WinTieLoss`)."""
    result = stats.win_tie_loss(wins, ties, losses, confidence=confidence, seed=seed)
    return {
        "model_a": model_a, "model_b": model_b, "judge": judge,
        "wins": wins, "ties": ties, "losses": losses, "n": result.n,
        "win_rate": {"value": result.win_rate, "low": result.win_rate_low, "high": result.win_rate_high},
        "at_least_as_good": {"value": result.at_least_as_good, "low": result.at_least_as_good_low,
                             "high": result.at_least_as_good_high},
        "sign_test_pvalue": result.sign_test_pvalue,
    }
