"""LLM judges: a template + a backend + a parser + a cache.

- :class:`ScalarJudge` asks for one score per (prompt, response) on the
  template's scale. An answer with no readable number is *unparsable*: it is
  counted, reported, and given the configured fallback (``midpoint``, ``min``,
  ``max``, a number, or ``error`` to stop). Never a silent zero.
- :class:`PairwiseJudge` asks "which is better, (A) or (B)?" twice, the second
  time with the two responses swapped, because judges prefer a position
  (Zheng et al. 2023, "Judging LLM-as-a-judge"). In ``generate`` mode two
  answers that disagree make a tie. In ``logprob`` mode the judge's
  probabilities of the option strings "(A)" and "(B)" give a soft label,
  averaged over both orders, so ``p(a > b) == 1 - p(b > a)`` exactly.

Every model answer is cached on disk (:mod:`alignkit.judges.cache`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from alignkit.config import GenerationConfig, ModelConfig, build, opt
from alignkit.data.formats import prompt_text
from alignkit.errors import AlignkitError, ConfigError
from alignkit.judges.backends import EndpointBackend, LocalBackend
from alignkit.judges.cache import VerdictCache, cache_key
from alignkit.judges.parsing import CLAMPED, OUT_OF_RANGE, UNPARSABLE, flip, parse_choice, parse_score
from alignkit.judges.template import Template, load_template

Messages = list[dict]
TIE = "tie"


@dataclass
class JudgeConfig:
    """A judge: which template, which model, how answers are read and cached."""

    template: str = opt("quality", help="a shipped template (quality, toxicity, pairwise, constitution) or a .txt file")
    backend: str = opt("local", choices=("local", "openai"))
    model: ModelConfig = field(default_factory=ModelConfig)
    base_url: str = opt("http://127.0.0.1:8000/v1", help="openai backend: the endpoint, up to /v1")
    api_key_env: str = opt("OPENAI_API_KEY", help="openai backend: the environment variable holding the key")
    timeout: float = opt(120.0, gt=0)
    concurrency: int = opt(4, ge=1, help="openai backend: requests in flight")
    mode: str = opt("generate", choices=("generate", "logprob"),
                    help="pairwise only: read the answer text, or compare P('(A)') with P('(B)')")
    guidelines: str = opt("", help="pairwise: replaces the template's default {guidelines}")
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=64, do_sample=False,
                                                                                  batch_size=8))
    fallback: str = opt("midpoint", help="unparsable answer: midpoint | min | max | a number | error "
                                         "(pairwise: a tie, or error)")
    out_of_range: str = opt("reject", choices=("reject", "clamp"),
                            help="a score outside the scale: reject (then the fallback applies) or clamp")
    cache: bool = True
    cache_dir: str | None = opt(None, help="default: $ALIGNKIT_CACHE/judge-cache")
    seed: int = 0


@dataclass
class JudgeStats:
    asked: int = 0  # judgements requested (a pairwise judgement asks two questions)
    calls: int = 0  # questions sent to the model (the rest came from the cache)
    cached: int = 0
    unparsable: int = 0
    out_of_range: int = 0
    clamped: int = 0
    inconsistent: int = 0  # pairwise: the swapped question gave the other answer
    examples: list = field(default_factory=list)  # a few unparsable answers, for the report
    soft: bool = False  # pairwise logprob mode: inconsistent orders give a near-0.5 soft label, not a tie

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("examples", "soft")} | {
            "unparsable_examples": self.examples}

    def summary(self, what: str) -> str:
        parts = [f"{self.asked} {what}", f"{self.calls} model calls", f"{self.cached} from cache"]
        if self.unparsable:
            parts.append(f"{self.unparsable} unparsable (fallback applied)")
        if self.out_of_range:
            parts.append(f"{self.out_of_range} out of range (fallback applied)")
        if self.clamped:
            parts.append(f"{self.clamped} clamped")
        if self.inconsistent:
            parts.append(f"{self.inconsistent} changed with the order of the two responses"
                         + (" (soft labels near 0.5)" if self.soft else " (ties)"))
        return ", ".join(parts)

    @classmethod
    def from_dict(cls, counts: dict, soft: bool = False) -> JudgeStats:
        """The stats :meth:`as_dict` wrote (or their sum over processes), to summarise them."""
        names = {f.name for f in dataclasses.fields(cls)} - {"examples", "soft"}
        return cls(**{k: int(v) for k, v in counts.items() if k in names},
                   examples=list(counts.get("unparsable_examples") or []), soft=soft)

    def warning(self, what: str, outcome: str, meaning: str = "the result says little") -> str | None:
        """A console line when answers could not be used, worded as eval's unreadable-judge warning:
        ``every judgement had an answer the judge's parser could not read and got the fallback score:
        the result says little (first: '...')``; None when every answer was read."""
        bad = self.unparsable + self.out_of_range
        if not bad:
            return None
        share = f"every {what}" if bad >= self.asked else f"{bad} of {self.asked} {what}s"
        reason = "could not read" + (" or found off the template's scale" if self.out_of_range else "")
        first = f" (first: {self.examples[0][:80]!r})" if self.examples else ""
        return f"{share} had an answer the judge's parser {reason} and {outcome}: {meaning}{first}"

    def note_bad(self, raw) -> None:
        if len(self.examples) < 5:
            self.examples.append(str(raw)[:200])


@dataclass(frozen=True)
class ScalarVerdict:
    score: float  # the parsed score, or the fallback
    status: str  # ok | clamped | out_of_range | unparsable
    raw: str  # the judge's answer
    fallback: bool = False


@dataclass(frozen=True)
class PairVerdict:
    winner: str  # "A", "B" or "tie"
    p_a: float  # P(response A is better): 1/0/0.5 in generate mode, a soft label in logprob mode
    consistent: bool  # both orders agreed
    parsed: bool  # False when an answer was unparsable (the verdict is then the fallback tie)
    raw: tuple  # the two answers (generate) or the two [logP(A), logP(B)] (logprob), A-first order first
    mass: tuple[float, float] | None = None  # logprob mode: P("(A)") + P("(B)") in each order, <= 1


class _Judge:
    def __init__(self, backend, template: Template, cfg: JudgeConfig, cache: VerdictCache | None):
        self.backend, self.template, self.cfg, self.cache = backend, template, cfg, cache
        self.stats = JudgeStats()
        self.name = f"judge:{template.name}"

    def _params(self, call: str) -> dict:
        g = self.cfg.generation
        if call == "logprob":
            return {"call": call, "options": list(self.template.options), "prefix": self.template.answer_prefix}
        return {"call": call, "max_new_tokens": g.max_new_tokens, "do_sample": g.do_sample,
                "temperature": g.temperature if g.do_sample else 0.0, "top_p": g.top_p, "top_k": g.top_k,
                "seed": self.cfg.seed}

    def _ask(self, conversations: list[Messages], inputs: list[dict], call: str) -> list:
        """The model's raw answers, from the cache where possible (one model call per new question)."""
        params = self._params(call)
        keys = [cache_key(judge=self.backend.id, template=self.template.text, inputs=inp, params=params)
                for inp in inputs]
        found = self.cache.get_many(keys) if self.cache is not None else {}
        # a stored answer of the wrong shape (an edited or damaged row) is asked again, not parsed
        found = {k: v for k, v in found.items() if _fits(call, v["answer"], len(self.template.options))}
        todo: dict[str, Messages] = {}
        for k, conv in zip(keys, conversations):
            if k not in found and k not in todo:
                todo[k] = conv
        if todo:
            convs = list(todo.values())
            if call == "logprob":
                answers = self.backend.option_logprobs(convs, self.template.options, self.template.answer_prefix)
            else:
                answers = self.backend.complete(convs, self.cfg.generation, seed=self.cfg.seed)
            new = {k: {"answer": a} for k, a in zip(todo, answers)}
            if self.cache is not None:
                self.cache.put_many(new)
            found = {**found, **new}
        self.stats.calls += len(todo)
        self.stats.cached += len(keys) - len(todo)
        return [found[k]["answer"] for k in keys]


class ScalarJudge(_Judge):
    def fallback_value(self) -> float | None:
        low, high = self.template.low, self.template.high
        fb = str(self.cfg.fallback).strip().lower()
        return {"midpoint": (low + high) / 2, "min": low, "max": high, "error": None}[fb] \
            if fb in ("midpoint", "min", "max", "error") else float(fb)

    def judge(self, prompts: list[Messages], responses: list[str]) -> list[ScalarVerdict]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        inputs = [{"prompt": prompt_text(p), "response": r} for p, r in zip(prompts, responses)]
        convs = [self.template.render(**inp) for inp in inputs]
        answers = self._ask(convs, inputs, "generate")
        fallback = self.fallback_value()
        out = []
        for raw in answers:
            parsed = parse_score(raw, self.template.low, self.template.high, self.cfg.out_of_range)
            self.stats.asked += 1
            if parsed.status == CLAMPED:
                self.stats.clamped += 1
            if parsed.value is None:
                self.stats.unparsable += parsed.status == UNPARSABLE
                self.stats.out_of_range += parsed.status == OUT_OF_RANGE
                self.stats.note_bad(raw)
                if fallback is None:
                    raise AlignkitError(f"{self.name}: cannot read a score in [{self.template.low:g}, "
                                        f"{self.template.high:g}] from the answer {raw[:120]!r} ({parsed.status}); "
                                        f"set the judge's fallback to midpoint, min, max or a number to go on")
                out.append(ScalarVerdict(fallback, parsed.status, raw, True))
            else:
                out.append(ScalarVerdict(parsed.value, parsed.status, raw))
        return out

    def score(self, prompts: list[Messages], responses: list[str]) -> np.ndarray:
        return np.array([v.score for v in self.judge(prompts, responses)], dtype=np.float64)


class PairwiseJudge(_Judge):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.stats.soft = self.cfg.mode == "logprob"

    def compare(self, prompts: list[Messages], responses_a: list[str], responses_b: list[str],
                guidelines: list[str] | str | None = None) -> list[PairVerdict]:
        """Which of a and b is better, for each prompt; asked in both orders."""
        n = len(prompts)
        if not len(responses_a) == len(responses_b) == n:
            raise ValueError("compare needs as many responses_a and responses_b as prompts")
        guide = guidelines if isinstance(guidelines, list) else [guidelines or self.cfg.guidelines] * n
        guide = [g or self.template.guidelines for g in guide]
        inputs = []
        for p, a, b, g in zip(prompts, responses_a, responses_b, guide):
            q = prompt_text(p)
            inputs.append({"prompt": q, "response_a": a, "response_b": b, "guidelines": g})
            inputs.append({"prompt": q, "response_a": b, "response_b": a, "guidelines": g})  # swapped
        convs = [self.template.render(**inp) for inp in inputs]
        mode = "logprob" if self.cfg.mode == "logprob" else "generate"
        answers = self._ask(convs, inputs, mode)
        verdicts = []
        for i in range(n):
            first, second = answers[2 * i], answers[2 * i + 1]
            verdicts.append(self._soft(first, second) if mode == "logprob" else self._text(first, second))
            self.stats.asked += 1
        return verdicts

    def _text(self, first: str, second: str) -> PairVerdict:
        c1, c2 = parse_choice(first), flip(parse_choice(second))
        if c1 is None or c2 is None:
            self.stats.unparsable += 1
            self.stats.note_bad(first if c1 is None else second)
            if str(self.cfg.fallback).strip().lower() == "error":
                raise AlignkitError(f"{self.name}: cannot read (A) or (B) from the answer "
                                    f"{(first if c1 is None else second)[:120]!r}; set fallback: midpoint to count it as a tie")
            return PairVerdict(TIE, 0.5, False, False, (first, second))
        if c1 != c2:
            self.stats.inconsistent += 1
            return PairVerdict(TIE, 0.5, False, True, (first, second))
        return PairVerdict(c1, {"A": 1.0, "B": 0.0, TIE: 0.5}[c1], True, True, (first, second))

    def _soft(self, first: list[float], second: list[float]) -> PairVerdict:
        # Normalised over the two options: P(A-first is better) in each order. In
        # the swapped order, response a sits behind option B.
        p_first = _sigmoid(first[0] - first[1])
        p_second = _sigmoid(second[1] - second[0])
        p_a = 0.5 * (p_first + p_second)
        winner = "A" if p_a > 0.5 else "B" if p_a < 0.5 else TIE
        consistent = (p_first - 0.5) * (p_second - 0.5) > 0
        self.stats.inconsistent += not consistent
        mass = (math.exp(first[0]) + math.exp(first[1]), math.exp(second[0]) + math.exp(second[1]))
        return PairVerdict(winner, p_a, consistent, True, (list(first), list(second)), mass)


def _fits(call: str, answer, n_options: int) -> bool:
    """A cached answer of the shape a call returns: text, or one finite log-probability per option."""
    if call != "logprob":
        return isinstance(answer, str)
    return (isinstance(answer, list) and len(answer) == n_options
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in answer))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def build_backend(cfg: JudgeConfig, model=None, tokenizer=None, device=None):
    if cfg.backend == "openai":
        return EndpointBackend(cfg.base_url, cfg.model.name, cfg.api_key_env, cfg.timeout, cfg.concurrency)
    if model is not None:
        return LocalBackend(cfg.model, model=model, tokenizer=tokenizer, batch_size=cfg.generation.batch_size)
    return LocalBackend(cfg.model, batch_size=cfg.generation.batch_size, device=device)


def check_fallback(value: str, template: Template) -> float:
    """A number as a scalar judge's fallback: finite and on the template's scale (answers off the scale are
    rejected, so a fallback there would be a score no answer can give), checked as a config key is by
    :func:`alignkit.config.build`, when the judge is built rather than after the sampling."""
    scale = dataclasses.make_dataclass("Fallback", [("fallback", float, opt(ge=template.low, le=template.high))])
    try:
        return build(scale, {"fallback": value}, "judge").fallback
    except ConfigError as e:
        raise ConfigError(f"{e} (template '{template.name}' scores {template.low:g} .. {template.high:g})") from None


def build_judge(cfg: JudgeConfig, backend=None, model=None, tokenizer=None, device=None) -> ScalarJudge | PairwiseJudge:
    """The judge a config describes; ``backend`` or a loaded ``model`` replace loading one.

    ``device``: where a local judge model goes when it loads (the stage's engine device).
    """
    template = check_judge_config(cfg)
    backend = backend or build_backend(cfg, model, tokenizer, device)
    cache = None
    if cfg.cache:
        from alignkit.models import cache_root

        cache = VerdictCache(cfg.cache_dir or cache_root(cfg.model.cache_dir) / "judge-cache")
    cls = ScalarJudge if template.kind == "scalar" else PairwiseJudge
    return cls(backend, template, cfg, cache)


def check_judge_config(cfg: JudgeConfig):
    """The template a judge config names, with its fallback and mode checked: what can be said
    wrong about a judge before any model loads (a stage calls it first, not after its sampling)."""
    template = load_template(cfg.template)
    fb = str(cfg.fallback).strip().lower()
    if template.kind == "scalar" and fb not in ("midpoint", "min", "max", "error"):
        try:
            float(fb)
        except ValueError:
            raise ConfigError(f"judge fallback must be midpoint, min, max, error or a number; got {cfg.fallback!r}") from None
        check_fallback(fb, template)
    if template.kind == "pairwise" and fb not in ("midpoint", "tie", "error"):
        raise ConfigError(f"a pairwise judge's fallback is a tie (midpoint) or error; got {cfg.fallback!r}")
    if cfg.mode == "logprob" and template.kind != "pairwise":
        raise ConfigError(f"judge mode logprob reads the options of a pairwise template; '{cfg.template}' is {template.kind}")
    return template
