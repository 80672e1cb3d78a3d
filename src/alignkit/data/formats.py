"""Record formats: SFT, preference pairs, Anthropic HH, rankings, KTO, prompts.

Each loader turns raw records (:mod:`alignkit.data.io`) into frozen dataclasses,
checking every field. A bad record raises :class:`~alignkit.errors.DataError`
naming file, line/row and field, or, with ``on_error="skip"``, is skipped and
counted in one warning. Prompts are always chat messages
(``[{"role": "user", "content": ...}]``); a plain-text prompt becomes one user turn.

Formats (one JSON object per line, or CSV/Parquet columns of the same names):

- SFT: ``{"prompt", "completion"}`` or ``{"messages": [...]}`` (the last message is
  the assistant's response).
- Preference: ``{"prompt", "chosen", "rejected", "margin"?}``; prompt, chosen and
  rejected may be text or messages. Without ``prompt``, chosen and rejected are
  full conversations and their shared prefix is the prompt (implicit prompt).
- Anthropic HH: ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``,
  the two differing only in the last assistant turn.
- Ranking: ``{"prompt", "completions": [K texts], "rankings": [{"labeler",
  "ranks": [r_0..r_K-1], "cant_rank"?}]}``; ``ranks[i]`` is the 1-based rank of
  ``completions[i]`` (1 = best; equal numbers are a tie; numbers are dense:
  ``[1, 1, 2]``, not ``[1, 1, 3]``). Instead of ``ranks`` a labeler may give
  ``order``: completion indices best first, a nested list for a tie
  (``[2, [0, 1]]``). Expanded to C(K,2) chosen-first pairs, rank gap as margin.
- KTO: ``{"prompt", "completion", "label": true|false}``.
- Prompts: ``{"prompt", "kind"?, "id"?}`` or ``builtin:prompts``.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any

from alignkit.data.io import ErrorPolicy, Record, first_parsed, read_records
from alignkit.errors import AlignkitError, ConfigError, DataError

Messages = list[dict]
ROLES = ("system", "user", "assistant")
AGGREGATION_RULES = ("per_labeler", "mean_rank")


def prompt_text(messages: Messages) -> str:
    """The last user turn of a prompt (what classifiers and judges read)."""
    for m in reversed(messages):
        if m["role"] == "user":
            return m["content"]
    return messages[-1]["content"]


@dataclass(frozen=True)
class SFTExample:
    prompt: Messages
    completion: str
    loc: str = ""


@dataclass(frozen=True)
class PreferencePair:
    prompt: Messages
    chosen: str
    rejected: str
    margin: float | None = None
    group: int = -1  # pairs expanded from one ranking share a group
    loc: str = ""


@dataclass(frozen=True)
class KTOExample:
    prompt: Messages
    completion: str
    label: bool
    loc: str = ""


@dataclass(frozen=True)
class LabelerRanking:
    labeler: str
    ranks: tuple[int, ...] | None  # None when cant_rank
    cant_rank: bool = False


@dataclass(frozen=True)
class RankingItem:
    prompt: Messages
    completions: tuple[str, ...]
    rankings: tuple[LabelerRanking, ...]
    loc: str = ""


@dataclass(frozen=True)
class PromptExample:
    prompt: Messages
    kind: str | None = None
    id: str | None = None
    loc: str = ""
    meta: dict = field(default_factory=dict, compare=False)


def where(rec: Record) -> str:
    return f"{rec.source}:{rec.location}"


# --------------------------------------------------------------------------- field checks


def _check_invalid(rec: Record) -> None:
    if "__invalid__" in rec.data:
        raise rec.error(None, rec.data["__invalid__"])


def _text(rec: Record, key: str, value: Any = None) -> str:
    value = rec.data.get(key) if value is None else value
    if key not in rec.data and value is None:
        raise rec.error(key, "missing field")
    if not isinstance(value, str):
        raise rec.error(key, f"must be text, got {type(value).__name__}")
    if not value.strip():
        raise rec.error(key, "empty text")
    return value


def _messages(rec: Record, key: str, value: Any) -> Messages:
    if not isinstance(value, list):
        raise rec.error(key, f"must be text or a list of chat messages, got {type(value).__name__}")
    if not value:
        raise rec.error(key, "must be a non-empty list of chat messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise rec.error(f"{key}[{i}]", "each message needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise rec.error(f"{key}[{i}].role", f"must be one of {', '.join(ROLES)}, got {m['role']!r}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise rec.error(f"{key}[{i}].content", "empty text" if isinstance(m["content"], str) else "must be text")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _prompt(rec: Record, key: str = "prompt") -> Messages:
    if key not in rec.data or rec.data[key] is None:
        raise rec.error(key, "missing field")
    value = rec.data[key]
    if isinstance(value, str):
        return [{"role": "user", "content": _text(rec, key)}]
    msgs = _messages(rec, key, value)
    if msgs[-1]["role"] == "assistant":
        raise rec.error(key, "a prompt must not end with an assistant turn")
    return msgs


def _response(rec: Record, key: str) -> str:
    """A response given as text or as a one-message assistant list."""
    if key not in rec.data or rec.data[key] is None:
        raise rec.error(key, "missing field")
    value = rec.data[key]
    if isinstance(value, str):
        return _text(rec, key)
    msgs = _messages(rec, key, value)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise rec.error(key, "must be text or a single assistant message")
    return msgs[0]["content"]


FLOAT32_MAX = 3.4028234663852886e38  # the loss is computed in float32: a larger margin is infinite there


def _margin(rec: Record) -> float | None:
    """How much chosen is preferred (a rank gap, a rating difference): a number >= 0. A negative one
    would tell the loss that rejected may score higher; one past float32's range makes it infinite."""
    m = rec.data.get("margin")
    if m is None or m == "":
        return None
    number = finite_number(rec, "margin", m)
    if number < 0:
        raise rec.error("margin", f"must be >= 0 (how much chosen is preferred), got {m!r}; "
                                  f"for the other way round swap chosen and rejected")
    if number > FLOAT32_MAX:
        raise rec.error("margin", f"must be at most {FLOAT32_MAX:.3g} (the float32 range), got {m!r}")
    return number


def _flag(rec: Record, key: str, value: Any) -> bool:
    """A true/false field; the text "true" / "false" (any case, as a CSV cell holds it) is read as one."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise rec.error(key, f"must be true or false, got {value!r}")
    return value


def finite_number(rec: Record, key: str, value: Any) -> float:
    """A record's number as float; text that reads as one is accepted, NaN and infinity are not
    (a margin of Infinity would make every loss infinite)."""
    if isinstance(value, bool):
        raise rec.error(key, f"must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise rec.error(key, f"must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise rec.error(key, f"must be a finite number, got {value!r}")
    return number


# --------------------------------------------------------------------------- loaders


def _load(path: str, split: str, on_error: str, parse, what: str, limit: int | None = None,
          kind: str | None = None) -> list:
    """Parse every record (``kind``: only those tagged so; an unreadable line is still an error)."""
    policy = ErrorPolicy(on_error)
    out: list = []
    for rec in read_records(path, split):
        if limit is not None and len(out) >= limit:
            break
        if kind is not None and "__invalid__" not in rec.data and rec.data.get("kind") != kind:
            continue
        policy.total += 1
        try:
            _check_invalid(rec)
            parsed = parse(rec)
        except DataError as e:
            policy.handle(e)
            continue
        if isinstance(parsed, list) and not parsed:
            policy.empty.append(where(rec))  # a ranking whose completions all tie, or flagged can't-rank
        out.extend(parsed if isinstance(parsed, list) else [parsed])
    policy.report(what)
    if not out:
        raise AlignkitError(f"{path}: no usable {what}" + (f" of kind {kind!r}" if kind is not None else ""))
    return out


def parse_sft(rec: Record) -> SFTExample:
    if "messages" in rec.data and rec.data["messages"] is not None:
        msgs = _messages(rec, "messages", rec.data["messages"])
        if msgs[-1]["role"] != "assistant":
            raise rec.error("messages", "the last message must be the assistant's response")
        if len(msgs) < 2:
            raise rec.error("messages", "needs at least one turn before the assistant's response")
        return SFTExample(msgs[:-1], msgs[-1]["content"], where(rec))
    if "prompt" not in rec.data and "completion" not in rec.data:
        raise rec.error("prompt", "missing field (an SFT record has prompt/completion or messages)")
    return SFTExample(_prompt(rec), _response(rec, "completion"), where(rec))


def load_sft(path: str, split: str = "train", on_error: str = "raise", limit: int | None = None,
             kind: str | None = None) -> list[SFTExample]:
    """Demonstrations; ``kind``: only the records with that ``kind`` field."""
    return _load(path, split, on_error, parse_sft, "SFT records", limit, kind)


HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_hh_transcript(rec: Record, key: str) -> Messages:
    text = _text(rec, key)
    parts = HH_TURN.split(text)
    if parts[0].strip():
        raise rec.error(key, "an HH transcript must start with '\\n\\nHuman: '")
    msgs = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        if msgs and msgs[-1]["role"] == role:  # repeated speaker: fold into one turn
            msgs[-1]["content"] += "\n\n" + content
        else:
            msgs.append({"role": role, "content": content})
    if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
        raise rec.error(key, "an HH transcript must end with an Assistant turn")
    if not msgs[-1]["content"].strip():
        raise rec.error(key, "the last Assistant turn is empty")
    return msgs


def parse_hh(rec: Record) -> PreferencePair:
    chosen = parse_hh_transcript(rec, "chosen")
    rejected = parse_hh_transcript(rec, "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise rec.error("rejected", "chosen and rejected must share everything but the last Assistant turn")
    return _pair(rec, chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])


def _pair(rec: Record, prompt: Messages, chosen: str, rejected: str, margin=None, group=-1) -> PreferencePair:
    if chosen.strip() == rejected.strip():
        raise rec.error("rejected", "chosen and rejected are identical")
    return PreferencePair(prompt, chosen, rejected, margin if margin is not None else _margin(rec), group, where(rec))


def parse_preference(rec: Record) -> PreferencePair:
    for key in ("chosen", "rejected"):
        if key not in rec.data or rec.data[key] is None:
            raise rec.error(key, "missing field")
    if "prompt" in rec.data and rec.data["prompt"] is not None:
        return _pair(rec, _prompt(rec), _response(rec, "chosen"), _response(rec, "rejected"))
    c, r = rec.data["chosen"], rec.data["rejected"]
    if isinstance(c, str) and isinstance(r, str):
        if HH_TURN.match(c):
            return parse_hh(rec)
        raise rec.error("prompt", "missing field (text chosen/rejected need a prompt)")
    # Implicit prompt: chosen and rejected are whole conversations.
    cm, rm = _messages(rec, "chosen", c), _messages(rec, "rejected", r)
    if cm[:-1] != rm[:-1] or cm[-1]["role"] != "assistant" or rm[-1]["role"] != "assistant" or len(cm) < 2:
        raise rec.error("rejected", "with an implicit prompt, chosen and rejected must be conversations "
                                    "that differ only in the last assistant message")
    return _pair(rec, cm[:-1], cm[-1]["content"], rm[-1]["content"])


def _dense_ranks_from_order(rec: Record, key: str, order: Any, k: int) -> tuple[int, ...]:
    if not isinstance(order, list):
        raise rec.error(key, "must be a list of completion indices, best first")
    ranks: dict[int, int] = {}
    for position, entry in enumerate(order, 1):
        group = entry if isinstance(entry, list) else [entry]
        for idx in group:
            if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < k:
                raise rec.error(key, f"index {idx!r} is not a completion index 0..{k - 1}")
            if idx in ranks:
                raise rec.error(key, f"completion {idx} appears twice (duplicate rank)")
            ranks[idx] = position
    missing = sorted(set(range(k)) - set(ranks))
    if missing:
        raise rec.error(key, f"completion(s) {missing} are not ranked (missing rank)")
    return tuple(ranks[i] for i in range(k))


def _check_ranks(rec: Record, key: str, ranks: Any, k: int) -> tuple[int, ...]:
    if not isinstance(ranks, list):
        raise rec.error(key, "must be a list of ranks, one per completion")
    if len(ranks) != k:
        raise rec.error(key, f"has {len(ranks)} ranks for {k} completions (missing rank)")
    for r in ranks:
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise rec.error(key, f"rank {r!r} must be a whole number >= 1")
    used = sorted(set(ranks))
    if used != list(range(1, len(used) + 1)):
        raise rec.error(key, f"ranks {ranks} skip a number; ties share a rank and the next rank follows "
                             f"(dense ranking, e.g. [1, 1, 2])")
    return tuple(ranks)


def parse_ranking(rec: Record) -> RankingItem:
    prompt = _prompt(rec)
    comps = rec.data.get("completions")
    if comps is None:
        raise rec.error("completions", "missing field")
    if not isinstance(comps, list) or len(comps) < 2:
        raise rec.error("completions", "must be a list of at least 2 texts")
    for i, c in enumerate(comps):
        _text(rec, f"completions[{i}]", c if c is not None else 0)
    if len({c.strip() for c in comps}) != len(comps):
        raise rec.error("completions", "two completions are identical")
    raw = rec.data.get("rankings")
    if raw is None:
        raise rec.error("rankings", "missing field")
    if not isinstance(raw, list) or not raw:
        raise rec.error("rankings", "must be a non-empty list of {labeler, ranks}")
    rankings = []
    for j, r in enumerate(raw):
        key = f"rankings[{j}]"
        if not isinstance(r, dict):
            raise rec.error(key, "must be an object with labeler and ranks")
        labeler = r.get("labeler") if r.get("labeler") is not None else f"labeler{j}"
        if isinstance(labeler, bool) or not isinstance(labeler, (str, int)) or not str(labeler).strip():
            raise rec.error(key + ".labeler", f"must be a name (text), got {labeler!r}")
        labeler = str(labeler)
        if r.get("cant_rank") is not None and _flag(rec, key + ".cant_rank", r["cant_rank"]):
            rankings.append(LabelerRanking(labeler, None, True))
        elif r.get("ranks") is not None:
            rankings.append(LabelerRanking(labeler, _check_ranks(rec, key + ".ranks", r["ranks"], len(comps))))
        elif r.get("order") is not None:
            rankings.append(LabelerRanking(labeler, _dense_ranks_from_order(rec, key + ".order", r["order"], len(comps))))
        else:
            raise rec.error(key + ".ranks", "missing field (give ranks, order, or cant_rank: true)")
    return RankingItem(prompt, tuple(comps), tuple(rankings), where(rec))


def ranking_to_pairs(item: RankingItem, aggregate: str = "per_labeler", group: int = -1) -> list[PreferencePair]:
    """Expand a ranking into chosen-first pairs, the rank gap as margin.

    ``per_labeler`` (InstructGPT): each labeler's ranking gives its C(K,2) pairs;
    tied pairs give nothing; a can't-rank flag gives nothing.
    ``mean_rank``: ranks are averaged over the labelers who did not flag the item;
    an item flagged by at least half of its labelers is dropped; pairs whose mean
    ranks differ are kept, the difference as margin.
    """
    if aggregate not in AGGREGATION_RULES:
        raise AlignkitError(f"unknown ranking aggregation '{aggregate}'; use {' or '.join(AGGREGATION_RULES)}")
    ranked = [r for r in item.rankings if not r.cant_rank]
    if aggregate == "per_labeler":
        rank_lists = [tuple(float(x) for x in r.ranks) for r in ranked]
    else:
        if len(ranked) * 2 <= len(item.rankings):
            return []
        k = len(item.completions)
        rank_lists = [tuple(sum(r.ranks[i] for r in ranked) / len(ranked) for i in range(k))]
    pairs = []
    for ranks in rank_lists:
        for i, j in itertools.combinations(range(len(item.completions)), 2):
            if ranks[i] == ranks[j]:
                continue
            best, worst = (i, j) if ranks[i] < ranks[j] else (j, i)
            pairs.append(PreferencePair(item.prompt, item.completions[best], item.completions[worst],
                                        abs(ranks[i] - ranks[j]), group, item.loc))
    return pairs


def load_rankings(path: str, split: str = "train", on_error: str = "raise", limit: int | None = None) -> list[RankingItem]:
    return _load(path, split, on_error, parse_ranking, "ranking records", limit)


def detect_format(rec: Record) -> str:
    d = rec.data
    if "completions" in d and "rankings" in d:
        return "ranking"
    if "label" in d and "completion" in d:
        return "kto"
    if "chosen" in d or "rejected" in d:
        c = d.get("chosen")
        if "prompt" not in d and isinstance(c, str) and HH_TURN.match(c):
            return "hh"
        return "preference"
    if "messages" in d or "completion" in d:
        return "sft"
    return "prompts"


def detect_file_format(path: str, split: str = "train") -> str | None:
    """The format of a file's first record that parses (None when none does): a first line that
    is not UTF-8 or not JSON says nothing about the rest."""
    first, _ = first_parsed(read_records(path, split))
    return None if first is None else detect_format(first)


def load_preferences(path: str, split: str = "train", on_error: str = "raise", fmt: str = "auto",
                     aggregate: str = "per_labeler", limit: int | None = None,
                     kind: str | None = None) -> list[PreferencePair]:
    """Preference pairs from pair files, HH transcripts or rankings (expanded); ``kind``: only
    the records with that ``kind`` field (label-ai writes the prompt's)."""
    counter = itertools.count()

    def parse(rec: Record):
        kind = detect_format(rec) if fmt == "auto" else fmt
        if kind == "ranking":
            return ranking_to_pairs(parse_ranking(rec), aggregate, group=next(counter))
        if kind == "hh":
            return parse_hh(rec)
        if kind == "preference":
            return parse_preference(rec)
        raise rec.error("chosen", f"not a preference record (looks like {kind}); need prompt/chosen/rejected, "
                                  f"an HH transcript or a ranking")

    return _load(path, split, on_error, parse, "preference records", limit, kind)


def parse_kto(rec: Record) -> KTOExample:
    label = rec.data.get("label")
    if label is None:
        raise rec.error("label", "missing field")
    return KTOExample(_prompt(rec), _response(rec, "completion"), _flag(rec, "label", label), where(rec))


def load_kto(path: str, split: str = "train", on_error: str = "raise", limit: int | None = None,
             kind: str | None = None) -> list[KTOExample]:
    """Thumbs-up / thumbs-down examples; ``kind``: only the records with that ``kind`` field."""
    return _load(path, split, on_error, parse_kto, "KTO records", limit, kind)


def record_kind(rec: Record) -> str | None:
    """The record's optional ``kind`` tag (``red_team``, ``helpful``, any word): routes gated
    rewards, filters with ``data.kind`` and splits the evaluation."""
    kind = rec.data.get("kind")
    if kind is not None and (not isinstance(kind, str) or not kind.strip()):
        raise rec.error("kind", f"must be a non-empty string (a prompt kind such as red_team), got {kind!r}")
    return kind


def parse_prompt(rec: Record) -> PromptExample:
    kind = record_kind(rec)
    meta = {k: v for k, v in rec.data.items() if k not in ("prompt", "kind", "id")}
    return PromptExample(_prompt(rec), kind, str(rec.data["id"]) if rec.data.get("id") is not None else None,
                         where(rec), meta)


def _sibling(setting: str, name: str) -> str:
    """The key beside ``setting``: ``data.prompts.format`` -> ``data.prompts.split``; ``--format`` -> ``--split``."""
    return f"--{name}" if setting.startswith("--") else f"{setting.rpartition('.')[0]}.{name}".lstrip(".")


def load_prompts(path: str, split: str = "train", on_error: str = "raise", kind: str | None = None,
                 limit: int | None = None, fmt: str = "auto", setting: str = "data.format") -> list[PromptExample]:
    """Prompt-only sets; ``builtin:prompts`` is alignkit's own set (train/test split).

    ``fmt`` is the config's format (key ``setting``): only ``auto`` or ``prompts`` mean anything
    here, as every record's ``prompt`` field is read whatever else it holds; another one would
    be ignored, so it is an error.
    """
    if fmt not in ("auto", "prompts"):
        raise ConfigError(f"{setting} must be prompts (or auto) for a stage that samples from prompts, "
                          f"got '{fmt}' (the 'prompt' field of each record is read)")
    if path == "builtin:prompts":
        from alignkit.data.builtin import KINDS, SPLITS, builtin_prompts

        for name, value, allowed in (("split", split, SPLITS), ("kind", kind, KINDS)):
            if value is not None and value not in allowed:
                raise ConfigError(f"{_sibling(setting, name)}: builtin:prompts has no {name} {value!r} "
                                  f"(its {name}s: {', '.join(allowed)})")
        rows = builtin_prompts(split=split, kind=kind)
        out = [PromptExample([{"role": "user", "content": r["prompt"]}], r["kind"], r["id"],
                             f"builtin:prompts:{r['id']}", {"category": r.get("category")}) for r in rows]
        return out[:limit] if limit else out
    return _load(path, split, on_error, _unique_ids(parse_prompt), "prompts", limit, kind or None)


def _unique_ids(parse):
    """``parse``, where a record whose ``id`` an earlier record already has is an error: the id names
    a prompt in samples, judgements and provenance, and two prompts under one id cannot be told apart."""
    first: dict[str, str] = {}

    def parse_once(rec: Record):
        parsed = parse(rec)
        if parsed.id is not None:
            if parsed.id in first:
                raise rec.error("id", f"{parsed.id!r} is also the id of {first[parsed.id]}: ids must be unique")
            first[parsed.id] = parsed.loc
        return parsed

    return parse_once
