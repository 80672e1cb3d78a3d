"""Turn a project's labels into the files the rest of alignkit trains and reports on.

Ranking projects write

- ``rankings.jsonl``: alignkit's ranking format, one item a line, every labeler's
  ranking kept (``alignkit rm`` trains on it directly)::

      {"id", "prompt", "completions", "rankings": [{"labeler", "ranks": [r_0, ...], "cant_rank": false}]}

  ``ranks[i]`` is the 1-based rank of ``completions[i]`` (1 = best, equal = tie);
  a can't-rank flag is ``{"labeler", "ranks": null, "cant_rank": true}``.
- ``preferences.jsonl``: TRL-ready pairs with an explicit prompt column::

      {"prompt", "chosen", "rejected", "margin"}

Pairwise (human evaluation) projects write

- ``winloss.jsonl``: one line per (item, labeler), model names restored::

      {"id", "prompt", "model_a", "model_b", "winner": "model_a" | "model_b" | "tie" | "both_bad", "labeler"}

- ``winloss_summary.json``: ``{"model_a", "model_b", "wins", "ties", "losses", "both_bad"}``
  from model_a's point of view, one consensus outcome per item.

Both write ``export_summary.json`` (counts, dropped items, agreement).

Consensus rules
---------------
Ranking -> preference pairs, per item:

1. Items where at least half of the labelers flagged "can't rank" are dropped
   (and counted as ``dropped_cant_rank``). Items with no label are skipped.
2. Each completion's mean rank is taken over the labelers who did rank it
   (ranks are dense: ties share a rank and the next rank follows).
3. Every pair of completions whose mean ranks differ becomes one preference:
   chosen = the lower (better) mean rank, margin = the difference of the mean
   ranks (> 0). Pairs with equal mean ranks (a consensus tie) give no pair; an
   item whose completions all tie gives none and is counted as ``dropped_all_tied``.

This is the ``mean_rank`` aggregation of ``alignkit.data.formats.ranking_to_pairs``,
so training on ``preferences.jsonl`` or on ``rankings.jsonl`` with that rule
gives the same pairs.

Pairwise -> outcome, per item: the majority choice among its labelers; when two
or more choices share the most votes the item counts as a tie.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import combinations
from pathlib import Path

from alignkit.errors import AlignkitError
from alignkit.feedback.agreement import project_agreement
from alignkit.feedback.storage import ItemRecord, Store


def ranking_line(r: ItemRecord) -> dict:
    line = {"id": r.ext_id, "prompt": r.prompt, "completions": r.completions}
    if r.meta:
        line["meta"] = r.meta
    line["rankings"] = [
        {"labeler": lab.labeler, "ranks": None if lab.cant_rank else list(lab.ranks), "cant_rank": lab.cant_rank}
        for lab in r.labels
    ]
    return line


def consensus_pairs(r: ItemRecord) -> tuple[list[dict], str | None]:
    """Preference pairs from one item's rankings -> (pairs, why dropped or None)."""
    if not r.labels:
        return [], "unlabeled"
    ranked = [lab.ranks for lab in r.labels if not lab.cant_rank and lab.ranks is not None]
    if len(ranked) * 2 <= len(r.labels):  # at least half flagged it
        return [], "cant_rank"
    k = len(r.completions)
    mean = [sum(ranks[i] for ranks in ranked) / len(ranked) for i in range(k)]
    pairs = []
    for i, j in combinations(range(k), 2):
        if mean[i] == mean[j]:
            continue
        better, worse = (i, j) if mean[i] < mean[j] else (j, i)
        pairs.append(
            {"prompt": r.prompt, "chosen": r.completions[better], "rejected": r.completions[worse], "margin": mean[worse] - mean[better]}
        )
    return pairs, None


def item_outcome(r: ItemRecord) -> str | None:
    """Majority choice on a pairwise item; a shared top count is a tie."""
    votes = Counter(lab.winner for lab in r.labels if lab.winner)
    if not votes:
        return None
    (top, n_top), *rest = votes.most_common()
    if rest and rest[0][1] == n_top:
        return "tie"
    return top


def winloss_lines(r: ItemRecord, model_a: str, model_b: str) -> list[dict]:
    return [
        {"id": r.ext_id, "prompt": r.prompt, "model_a": model_a, "model_b": model_b, "winner": lab.winner, "labeler": lab.labeler}
        for lab in r.labels
        if lab.winner
    ]


def winloss_summary(records: list[ItemRecord], model_a: str, model_b: str) -> dict:
    outcomes = Counter(item_outcome(r) for r in records)
    return {
        "model_a": model_a,
        "model_b": model_b,
        "wins": outcomes["model_a"],
        "ties": outcomes["tie"],
        "losses": outcomes["model_b"],
        "both_bad": outcomes["both_bad"],
    }


def build_export(store: Store, name: str) -> tuple[dict, dict[str, str]]:
    """A project's export: (summary, {file name: text}); nothing is written."""
    project, records = store.project_records(name)
    labeled = [r for r in records if r.labels]
    summary = {
        "project": project.name,
        "kind": project.kind,
        "overlap": project.overlap,
        "items": len(records),
        "items_labeled": len(labeled),
        "items_below_overlap": sum(1 for r in records if len(r.labels) < project.overlap),
        "labels": sum(len(r.labels) for r in records),
        "agreement": project_agreement(project.kind, labeled),
    }
    files: dict[str, str] = {}
    if project.kind == "ranking":
        dropped = Counter()
        rank_lines, pref_lines = [], []
        for r in labeled:
            rank_lines.append(_dumps(ranking_line(r)))
            pairs, why = consensus_pairs(r)
            if why:
                dropped[why] += 1
            elif not pairs:  # labelled, yet every completion ties on mean rank: counted, not lost unseen
                dropped["all_tied"] += 1
            pref_lines.extend(_dumps(pair) for pair in pairs)
        summary["preference_pairs"] = len(pref_lines)
        summary["dropped_cant_rank"] = dropped["cant_rank"]
        summary["dropped_all_tied"] = dropped["all_tied"]
        files["rankings.jsonl"] = "".join(rank_lines)
        files["preferences.jsonl"] = "".join(pref_lines)
    else:
        lines = [_dumps(line) for r in labeled for line in winloss_lines(r, project.model_a, project.model_b)]
        table = winloss_summary(labeled, project.model_a, project.model_b)
        summary["winloss"] = table
        files["winloss.jsonl"] = "".join(lines)
        files["winloss_summary.json"] = json.dumps(table, indent=2) + "\n"
    summary["files"] = sorted(files) + ["export_summary.json"]
    files["export_summary.json"] = json.dumps(summary, indent=2) + "\n"
    return summary, files


def export_project(store: Store, name: str, out_dir: str | Path) -> dict:
    """Write a project's export files into ``out_dir``; returns the export summary.

    A folder that cannot take the files (``out_dir`` is a file, a target is a folder, no permission)
    is an AlignkitError naming the path, found before any file is replaced: an export is written
    whole or not at all, never half over an older one.
    """
    summary, files = build_export(store, name)
    out = Path(out_dir)
    try:
        if out.exists() and not out.is_dir():
            raise AlignkitError(f"--out {out}: is a file, not a folder")
        for file_name in files:
            if (out / file_name).is_dir():
                raise AlignkitError(f"--out {out}: {out / file_name} is a folder; the export writes a file there")
        out.mkdir(parents=True, exist_ok=True)
        # Write every file beside its target first, then rename: a reader never sees half a
        # file, and a failure while writing leaves the older export as it was.
        written = []
        try:
            for file_name, text in files.items():
                tmp = out / (file_name + ".tmp")
                written.append(tmp)
                tmp.write_text(text, encoding="utf-8")
            for file_name in files:
                (out / (file_name + ".tmp")).replace(out / file_name)
        finally:
            for tmp in written:
                tmp.unlink(missing_ok=True)
    except OSError as e:
        where = e.filename or out
        raise AlignkitError(f"--out {out}: cannot write the export ({where}: {e.strerror or e})") from None
    return summary


def _dumps(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"
