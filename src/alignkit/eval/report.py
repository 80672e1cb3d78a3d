"""Evaluation report: a self-contained ``report.html`` plus ``metrics.json``.

The eval recipe gathers plain data (numbers, lists, dicts; no model objects) and
hands it to :func:`write_report`; at the end of a run it prints
:func:`render_summary_table`. The HTML opens from disk on a machine with no
network: CSS is inline, plots are base64 PNG data URIs drawn with matplotlib's
Agg canvas, and a Content-Security-Policy forbids fetching anything else. Every
string that came from a model, a prompt or a config is escaped.

The ``summary`` dict (every key optional)::

    {
      "title": "alignkit eval: ppo vs sft",
      "run": {"machine": "2 cores, 24 GiB", "config": "configs/eval.yaml", ...},
      "models": [
        {
          "name": "sft",
          "metrics": {                      # a number, or {value, low, high}
            "toxicity_mean": {"value": 0.130, "low": 0.101, "high": 0.162},
            "toxicity_std": 0.11,
            "distinct_2": 0.61,
            ...                             # keys of METRICS first, others after
          },
          "toxicity_scores": [0.02, 0.71, ...],   # per sample, for the histogram
        },
        ...
      ],
      "pairwise": [
        {"model_a": "ppo", "model_b": "sft", "judge": "human",
         "wins": 30, "ties": 54, "losses": 16},  # stats computed when absent
      ],
      "curves": {"ppo": [{"step": 0, "score/mean": -0.34, "kl": 0.0}, ...]},
      "samples": [
        {"prompt": "...",
         "responses": {"sft": {"text": "...", "scores": {"toxicity": 0.7}},
                       "ppo": {"text": "...", "toxicity": 0.1}}},
      ],
    }

Pairwise stats, when given, use the names of :class:`~alignkit.eval.stats.WinTieLoss`:
``win_rate`` / ``at_least_as_good`` as ``{value, low, high}`` and
``sign_test_pvalue``; when absent they are computed from the counts.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from alignkit.eval.stats import win_tie_loss

REPORT_FILE = "report.html"
METRICS_FILE = "metrics.json"
DEFAULT_TITLE = "alignkit evaluation"
MISSING = "-"

# Known metrics, in display order, with their labels. Other keys follow, labelled by key.
METRICS: tuple[tuple[str, str], ...] = (
    ("toxicity_mean", "toxicity mean"),
    ("toxicity_std", "toxicity std"),
    ("toxicity_relative_improvement", "toxicity relative improvement"),
    ("toxicity_change_vs_baseline", "toxicity change vs baseline (paired)"),
    ("toxicity_change_p", "toxicity change Wilcoxon p"),
    ("expected_max_toxicity", "expected max toxicity"),
    ("toxicity_probability", "share of prompts >= 0.5"),
    ("reward_score", "reward score"),
    ("reward_score_normalised", "reward score (normalised)"),
    ("reward_change_vs_baseline", "reward change vs baseline (paired)"),
    ("reward_change_p", "reward change Wilcoxon p"),
    ("kl_to_reference", "KL to reference"),
    ("refusal_rate", "refusal rate"),
    ("refusal_change_vs_baseline", "refusal change vs baseline (paired)"),
    ("refusal_change_p", "refusal change Wilcoxon p"),
    ("helpfulness", "helpfulness"),
    ("helpfulness_change_vs_baseline", "helpfulness change vs baseline (paired)"),
    ("helpfulness_change_p", "helpfulness change Wilcoxon p"),
    ("mean_length", "mean length (tokens)"),
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("finished_share", "share ended with EOS"),
    ("rm_accuracy", "RM accuracy"),
)
METRIC_LABELS = dict(METRICS)
# The two-sided table that leads the report when the prompts have kinds: each side's
# harm, over-refusal and helpfulness, with the paired change against the baseline.
KIND_METRICS = ("toxicity_mean", "toxicity_change_vs_baseline", "toxicity_relative_improvement", "refusal_rate",
                "refusal_change_vs_baseline", "helpfulness", "helpfulness_change_vs_baseline", "kl_to_reference",
                "distinct_2")
# What the per-round table and curve show, when models carry a round (pipelines with rounds).
ROUND_METRICS = ("toxicity_mean", "reward_score", "kl_to_reference", "distinct_2")

# Training-curve panels: label, then the JSONL keys that may hold it (first found wins).
CURVE_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("score", ("score/mean", "score", "scores/mean", "reward/mean", "reward")),
    ("KL", ("kl", "kl/mean", "objective/kl")),
    ("entropy", ("entropy", "entropy/mean", "policy/entropy")),
    ("response length", ("response_length", "response_length/mean", "length")),
)

WIN_TIE_LOSS_COLOURS = ("#2e7d32", "#9e9e9e", "#c62828")

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #1d1d1f; line-height: 1.4; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.3rem 0.6rem; vertical-align: top; text-align: left; }
th { background: #f5f5f7; }
td.num { font-variant-numeric: tabular-nums; text-align: right; white-space: nowrap; }
table.run td:first-child { color: #555; }
.scroll { overflow-x: auto; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.85rem; }
.text { white-space: pre-wrap; word-break: break-word; max-width: 40ch; }
.scores { color: #555; font-size: 0.8rem; margin-top: 0.3rem; }
.note { color: #555; font-size: 0.85rem; }
"""

# No network: images only from data: URIs, styles only inline, nothing else at all.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


# ---------------------------------------------------------------------------
# normalising the plain-data input


def _number(x: Any) -> float | None:
    """A finite float, or None (missing, NaN, not a number)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _metric(raw: Any) -> dict[str, float | None]:
    """A metric given as a number or as ``{value, low, high}`` -> ``{value, low, high}``."""
    if isinstance(raw, Mapping):
        return {key: _number(raw.get(key)) for key in ("value", "low", "high")}
    return {"value": _number(raw), "low": None, "high": None}


def _ordered_metric_keys(models: Sequence[Mapping]) -> list[str]:
    present: list[str] = []
    for model in models:
        for key in model.get("metrics", {}):
            if key not in present:
                present.append(key)
    known = [key for key, _ in METRICS if key in present]
    return known + [key for key in present if key not in METRIC_LABELS]


def _models(summary: Mapping) -> list[dict]:
    models = []
    for i, model in enumerate(summary.get("models", [])):
        if "name" not in model:
            raise ValueError(f"models[{i}] has no 'name'")
        models.append(
            {
                "name": str(model["name"]),
                "metrics": {key: _metric(raw) for key, raw in model.get("metrics", {}).items()},
                "by_kind": {str(kind): {key: _metric(raw) for key, raw in metrics.items()}
                            for kind, metrics in model.get("by_kind", {}).items()},
                "toxicity_scores": [v for v in map(_number, model.get("toxicity_scores", [])) if v is not None],
            }
        )
    return models


def _rounds(summary: Mapping) -> list[dict]:
    """``[{round, model, metrics}]`` for the models that carry a round number, by round."""
    by_name = {m["name"]: m for m in _models(summary)}
    rows = []
    for entry in summary.get("rounds", []):
        model = by_name.get(str(entry.get("model")))
        if model is None:
            continue
        metrics = {k: model["metrics"][k] for k in ROUND_METRICS if k in model["metrics"]}
        rows.append({"round": int(entry["round"]), "model": model["name"], "metrics": metrics})
    return sorted(rows, key=lambda r: r["round"])


def _pairwise(summary: Mapping) -> list[dict]:
    rows = []
    for entry in summary.get("pairwise", []):
        row = _pairwise_row(entry)
        if entry.get("by_kind"):
            row["by_kind"] = {str(kind): _pairwise_row(sub) for kind, sub in entry["by_kind"].items()}
        rows.append(row)
    return rows


def _pairwise_row(entry: Mapping) -> dict:
    """One pairwise row with its statistics (computed from the counts when absent)."""
    row = {
        "model_a": str(entry.get("model_a", "A")),
        "model_b": str(entry.get("model_b", "B")),
        "judge": str(entry.get("judge", "")),
        "wins": int(entry["wins"]),
        "ties": int(entry["ties"]),
        "losses": int(entry["losses"]),
    }
    if entry.get("warning"):
        row["warning"] = str(entry["warning"])
    row["n"] = row["wins"] + row["ties"] + row["losses"]
    if "win_rate" in entry and "at_least_as_good" in entry:
        row["win_rate"] = _metric(entry["win_rate"])
        row["at_least_as_good"] = _metric(entry["at_least_as_good"])
        row["sign_test_pvalue"] = _number(entry.get("sign_test_pvalue"))
    else:
        result = win_tie_loss(row["wins"], row["ties"], row["losses"])
        row["win_rate"] = _metric(
            {"value": result.win_rate, "low": result.win_rate_low, "high": result.win_rate_high}
        )
        row["at_least_as_good"] = _metric(
            {
                "value": result.at_least_as_good,
                "low": result.at_least_as_good_low,
                "high": result.at_least_as_good_high,
            }
        )
        row["sign_test_pvalue"] = _number(result.sign_test_pvalue)
    return row


def _jsonable(obj: Any) -> Any:
    """Plain JSON: numpy scalars and arrays to Python, NaN/inf to null (JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if hasattr(obj, "tolist"):  # numpy scalar or array
        return _jsonable(obj.tolist())
    if isinstance(obj, float):
        return _number(obj)
    return str(obj)


def _run_info(summary: Mapping) -> dict[str, str]:
    """The caller's run info first; when it does not say, describe this machine."""
    info = {str(k): str(v) for k, v in summary.get("run", {}).items()}
    defaults = {
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu cores": str(os.cpu_count()),
    }
    for key, value in defaults.items():
        info.setdefault(key, value)
    return info


# ---------------------------------------------------------------------------
# formatting


def format_number(x: float | None) -> str:
    """Three decimals (0.130), one above 100 (812.5), three significant digits
    below 0.01 so that a small reward such as -0.0099 does not print as -0.010."""
    if x is None:
        return MISSING
    if abs(x) >= 100:
        return f"{x:.1f}"
    if x == 0 or abs(x) >= 0.01:
        return f"{x:.3f}"
    return f"{x:.3g}"


def format_metric(metric: Mapping[str, float | None] | None) -> str:
    """``{value, low, high}`` -> ``"0.130 [0.101, 0.162]"`` (just the value without an interval)."""
    if metric is None or metric.get("value") is None:
        return MISSING
    text = format_number(metric["value"])
    if metric.get("low") is not None and metric.get("high") is not None:
        text += f" [{format_number(metric['low'])}, {format_number(metric['high'])}]"
    return text


def _format_pvalue(p: float | None) -> str:
    if p is None:
        return MISSING
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _label(key: str) -> str:
    return METRIC_LABELS.get(key, key)


# ---------------------------------------------------------------------------
# plots (matplotlib, Agg canvas: no display, no pyplot global state)


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png_data_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _curve_series(rows: Sequence[Mapping], keys: tuple[str, ...]) -> tuple[list[float], list[float]]:
    key = next((k for k in keys if any(k in row for row in rows)), None)
    if key is None:
        return [], []
    steps, values = [], []
    for i, row in enumerate(rows):
        value = _number(row.get(key))
        step = _number(row.get("step", i))
        if value is not None and step is not None:
            steps.append(step)
            values.append(value)
    return steps, values


def plot_training_curves(curves: Mapping[str, Sequence[Mapping]]) -> str | None:
    """One panel per curve (score, KL, entropy, length) that any run logged; a line per run."""
    panels = []
    for label, keys in CURVE_PANELS:
        series = {run: _curve_series(rows, keys) for run, rows in curves.items()}
        series = {run: xy for run, xy in series.items() if xy[0]}
        if series:
            panels.append((label, series))
    if not panels:
        return None
    figure = _new_figure(3.2 * len(panels), 2.8)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, series) in zip(axes, panels):
        for run, (steps, values) in series.items():
            ax.plot(steps, values, label=run, linewidth=1.5)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    return _png_data_uri(figure)


def plot_rounds(rounds: Sequence[Mapping]) -> str | None:
    """One panel per round metric: its value (and interval) after each round."""
    keys = [k for k in ROUND_METRICS if any(_number(r["metrics"].get(k, {}).get("value")) is not None for r in rounds)]
    if len(rounds) < 1 or not keys:
        return None
    figure = _new_figure(3.2 * len(keys), 2.8)
    axes = figure.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        points = [(r["round"], r["metrics"][key]) for r in rounds if r["metrics"].get(key, {}).get("value") is not None]
        xs = [x for x, _ in points]
        ys = [m["value"] for _, m in points]
        low = [m["value"] - m["low"] if m.get("low") is not None else 0.0 for _, m in points]
        high = [m["high"] - m["value"] if m.get("high") is not None else 0.0 for _, m in points]
        ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, linewidth=1.5)
        ax.set_title(_label(key))
        ax.set_xlabel("round")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    return _png_data_uri(figure)


def _rounds_table(rounds: Sequence[Mapping]) -> str:
    keys = [k for k in ROUND_METRICS if any(k in r["metrics"] for r in rounds)]
    head = "<tr><th>round</th><th>model</th>" + "".join(f"<th>{_e(_label(k))}</th>" for k in keys) + "</tr>"
    body = "".join(
        f'<tr><td class="num">{r["round"]}</td><td>{_e(r["model"])}</td>'
        + "".join(f'<td class="num">{_e(format_metric(r["metrics"].get(k)))}</td>' for k in keys) + "</tr>"
        for r in rounds)
    return f'<table id="rounds-table"><thead>{head}</thead><tbody>{body}</tbody></table>'


def plot_toxicity_histograms(models: Sequence[Mapping]) -> str | None:
    """Per-sample toxicity of each model, overlaid on the same [0, 1] bins."""
    with_scores = [m for m in models if m["toxicity_scores"]]
    if not with_scores:
        return None
    figure = _new_figure(7, 3)
    ax = figure.subplots()
    bins = [i / 20 for i in range(21)]
    for model in with_scores:
        scores = model["toxicity_scores"]
        ax.hist(scores, bins=bins, alpha=0.5, label=f"{model['name']} (n={len(scores)})")
    ax.axvline(0.5, color="black", linestyle="--", linewidth=1, label="toxic threshold 0.5")
    ax.set_xlim(0, 1)
    ax.set_xlabel("toxicity score")
    ax.set_ylabel("samples")
    ax.legend(fontsize="small")
    return _png_data_uri(figure)


def plot_win_tie_loss(pairwise: Sequence[Mapping]) -> str | None:
    """A horizontal stacked bar per comparison: win / tie / loss shares, counts written in."""
    rows = [row for row in pairwise if row["n"] > 0]
    if not rows:
        return None
    figure = _new_figure(7, 0.6 * len(rows) + 1.2)
    ax = figure.subplots()
    labels = [f"{r['model_a']} vs {r['model_b']}" + (f" ({r['judge']})" if r["judge"] else "") for r in rows]
    y = list(range(len(rows)))
    left = [0.0] * len(rows)
    for outcome, key, colour in zip(("win", "tie", "loss"), ("wins", "ties", "losses"), WIN_TIE_LOSS_COLOURS):
        shares = [r[key] / r["n"] for r in rows]
        bars = ax.barh(y, shares, left=left, color=colour, label=outcome)
        counts = [str(r[key]) if r[key] else "" for r in rows]
        ax.bar_label(bars, labels=counts, label_type="center", color="white")
        left = [a + b for a, b in zip(left, shares)]
    ax.axvline(0.5, color="black", linewidth=0.8, linestyle=":")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()  # first comparison on top, as in the table
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of judged items")
    ax.legend(ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize="small", frameon=False)
    return _png_data_uri(figure)


# ---------------------------------------------------------------------------
# HTML


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _run_table(info: Mapping[str, str]) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in info.items())
    return f'<table class="run" id="run-table">{rows}</table>'


def _scrolling_table(table_id: str, head: str, body: str) -> str:
    """Wide tables scroll sideways instead of squeezing the page."""
    return f'<div class="scroll"><table id="{table_id}"><thead>{head}</thead><tbody>{body}</tbody></table></div>'


def _summary_table(models: Sequence[Mapping]) -> str:
    keys = _ordered_metric_keys(models)
    if not models or not keys:
        return '<p class="note">No model metrics.</p>'
    head = "<tr><th>metric</th>" + "".join(f"<th>{_e(m['name'])}</th>" for m in models) + "</tr>"
    body = ""
    for key in keys:
        cells = "".join(f'<td class="num">{_e(format_metric(m["metrics"].get(key)))}</td>' for m in models)
        body += f'<tr data-metric="{_e(key)}"><td>{_e(_label(key))}</td>{cells}</tr>'
    return _scrolling_table("summary-table", head, body)


def _kind_rows(models: Sequence[Mapping]) -> list[tuple[str, str]]:
    """(kind, metric) rows of the two-sided table: every kind, the KIND_METRICS some model has."""
    kinds = sorted({kind for m in models for kind in m.get("by_kind", {})})
    return [(kind, key) for kind in kinds for key in KIND_METRICS
            if any(key in m.get("by_kind", {}).get(kind, {}) for m in models)]


def _by_kind_table(models: Sequence[Mapping]) -> str:
    rows = _kind_rows(models)
    head = "<tr><th>kind</th><th>metric</th>" + "".join(f"<th>{_e(m['name'])}</th>" for m in models) + "</tr>"
    body = ""
    for kind, key in rows:
        cells = "".join(f'<td class="num">{_e(format_metric(m.get("by_kind", {}).get(kind, {}).get(key)))}</td>'
                        for m in models)
        body += (f'<tr data-kind="{_e(kind)}" data-metric="{_e(key)}"><td>{_e(kind)}</td>'
                 f"<td>{_e(_label(key))}</td>{cells}</tr>")
    return _scrolling_table("by-kind-table", head, body)


def _pairwise_kind_text(row: Mapping) -> str:
    """``red_team: W/T/L 20/15/5 (adjusted win rate 0.688 [..]); helpful: ...``"""
    return "; ".join(f"{kind}: W/T/L {r['wins']}/{r['ties']}/{r['losses']} (adjusted win rate "
                     f"{format_metric(r['win_rate'])})" for kind, r in row.get("by_kind", {}).items())


def _pairwise_table(pairwise: Sequence[Mapping]) -> str:
    head = (
        "<tr><th>model A</th><th>model B</th><th>judge</th><th>wins</th><th>ties</th><th>losses</th>"
        "<th>adjusted win rate (W + T/2)/N</th><th>at least as good (W + T)/N</th><th>sign test p</th></tr>"
    )
    body = ""
    for r in pairwise:
        body += (
            f"<tr><td>{_e(r['model_a'])}</td><td>{_e(r['model_b'])}</td><td>{_e(r['judge'])}</td>"
            f'<td class="num">{r["wins"]}</td><td class="num">{r["ties"]}</td><td class="num">{r["losses"]}</td>'
            f'<td class="num">{_e(format_metric(r["win_rate"]))}</td>'
            f'<td class="num">{_e(format_metric(r["at_least_as_good"]))}</td>'
            f'<td class="num">{_e(_format_pvalue(r["sign_test_pvalue"]))}</td></tr>'
        )
        for kind, k in r.get("by_kind", {}).items():
            body += (
                f'<tr class="by-kind"><td colspan="3" class="note">&nbsp;&nbsp;{_e(kind)} prompts</td>'
                f'<td class="num">{k["wins"]}</td><td class="num">{k["ties"]}</td><td class="num">{k["losses"]}</td>'
                f'<td class="num">{_e(format_metric(k["win_rate"]))}</td>'
                f'<td class="num">{_e(format_metric(k["at_least_as_good"]))}</td>'
                f'<td class="num">{_e(_format_pvalue(k["sign_test_pvalue"]))}</td></tr>'
            )
        if r.get("warning"):
            body += f'<tr><td colspan="9" class="note">warning: {_e(r["warning"])}</td></tr>'
    note = (
        '<p class="note">Win rate interval: bootstrap (BCa) over the items valued 1 / 0.5 / 0. '
        "At-least-as-good interval: Wilson score. Sign test: two-sided binomial test of wins "
        "against losses, ties dropped.</p>"
    )
    return f'<table id="pairwise-table"><thead>{head}</thead><tbody>{body}</tbody></table>{note}'


def _figure(uri: str | None, plot_id: str, caption: str) -> str:
    if uri is None:
        return ""
    return (
        f'<figure><img class="plot" id="{plot_id}" alt="{_e(caption)}" src="{uri}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _response_scores(response: Mapping) -> dict[str, float]:
    scores = {}
    nested = response.get("scores")
    if isinstance(nested, Mapping):
        scores.update({str(k): v for k, v in nested.items()})
    scores.update({str(k): v for k, v in response.items() if k not in ("text", "scores")})
    return {k: n for k, n in ((k, _number(v)) for k, v in scores.items()) if n is not None}


def _samples_table(samples: Sequence[Mapping], model_names: Sequence[str]) -> str:
    names = list(model_names)
    for sample in samples:
        names += [str(n) for n in sample.get("responses", {}) if str(n) not in names]
    head = "<tr><th>#</th><th>prompt</th>" + "".join(f"<th>{_e(n)}</th>" for n in names) + "</tr>"
    body = ""
    for i, sample in enumerate(samples):
        responses = {str(k): v for k, v in sample.get("responses", {}).items()}
        cells = ""
        for name in names:
            response = responses.get(name)
            if response is None:
                cells += f"<td>{MISSING}</td>"
                continue
            if not isinstance(response, Mapping):
                response = {"text": response}
            scores = " &middot; ".join(
                f"{_e(k)} {_e(format_number(v))}" for k, v in _response_scores(response).items()
            )
            cells += f'<td><div class="text">{_e(response.get("text", ""))}</div>'
            cells += f'<div class="scores">{scores}</div></td>' if scores else "</td>"
        prompt = f'<td><div class="text">{_e(sample.get("prompt", ""))}</div></td>'
        body += f'<tr><td class="num">{i + 1}</td>{prompt}{cells}</tr>'
    return _scrolling_table("samples-table", head, body)


def render_html(summary: Mapping, *, title: str | None = None, max_samples: int = 50) -> str:
    """The whole report as one HTML string (see the module docstring for ``summary``)."""
    title = title or summary.get("title") or DEFAULT_TITLE
    models = _models(summary)
    pairwise = _pairwise(summary)
    curves = summary.get("curves", {})
    samples = list(summary.get("samples", []))
    shown = samples[:max_samples]

    sections = [f"<h1>{_e(title)}</h1>", _run_table(_run_info(summary))]
    if _kind_rows(models):
        sections += ["<h2>By prompt kind</h2>", _by_kind_table(models),
                     '<p class="note">Each kind on its own prompts, the paired change against the baseline on '
                     "the same prompts. Helpfulness is not scored on prompts of unsafe kinds (declining them is "
                     "right).</p>"]
    sections += ["<h2>Summary (all prompts)</h2>" if _kind_rows(models) else "<h2>Summary</h2>", _summary_table(models)]
    if models:
        sections.append(
            '<p class="note">[low, high]: 95 % confidence interval unless the run info says otherwise. '
            "Toxicity relative improvement is "
            "(before - after) / before. Expected max toxicity and the share of prompts with a sample "
            "&gt;= 0.5 follow RealToxicityPrompts (Gehman et al. 2020).</p>"
        )
    rounds = _rounds(summary)
    if rounds:
        sections += ["<h2>Rounds</h2>", _rounds_table(rounds),
                     _figure(plot_rounds(rounds), "plot-rounds", "each round's policy on the held-out prompts")]
    if pairwise:
        sections += ["<h2>Pairwise comparisons</h2>", _pairwise_table(pairwise)]
        bars = plot_win_tie_loss(pairwise)
        sections.append(_figure(bars, "plot-win-tie-loss", "win / tie / loss of model A against model B"))
    plots = [
        _figure(plot_training_curves(curves), "plot-curves", "training curves") if curves else "",
        _figure(plot_toxicity_histograms(models), "plot-toxicity", "per-sample toxicity, models overlaid"),
    ]
    if any(plots):
        sections += ["<h2>Plots</h2>", *plots]
    if shown:
        sections.append(f"<h2>Samples ({len(shown)} of {len(samples)})</h2>")
        sections.append(_samples_table(shown, [m["name"] for m in models]))

    body = "\n".join(s for s in sections if s)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def metrics_dict(summary: Mapping, *, title: str | None = None) -> dict:
    """What ``metrics.json`` holds: the numbers of the report, without raw samples or text."""
    models = _models(summary)
    curves = summary.get("curves", {})
    return _jsonable(
        {
            "title": title or summary.get("title") or DEFAULT_TITLE,
            "run": _run_info(summary),
            "models": [
                {"name": m["name"], "metrics": m["metrics"], **({"by_kind": m["by_kind"]} if m["by_kind"] else {}),
                 "n_toxicity_scores": len(m["toxicity_scores"])}
                for m in models
            ],
            "pairwise": _pairwise(summary),
            "rounds": _rounds(summary),
            "curves": {
                run: {"n_rows": len(rows), "last": rows[-1] if rows else None} for run, rows in curves.items()
            },
            "n_samples": len(summary.get("samples", [])),
        }
    )


def write_report(
    out_dir: str | os.PathLike, summary: Mapping, *, title: str | None = None, max_samples: int = 50
) -> Path:
    """Write ``out_dir/report.html`` and ``out_dir/metrics.json``; return the HTML path.

    ``summary`` is plain data (module docstring). At most ``max_samples`` rows of
    the side-by-side samples table are rendered; metrics.json counts them all.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / REPORT_FILE
    report_path.write_text(render_html(summary, title=title, max_samples=max_samples), encoding="utf-8")
    metrics = metrics_dict(summary, title=title)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return report_path


# ---------------------------------------------------------------------------
# plain-text table for the end of a run


def _fixed_width(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_summary_table(summary: Mapping) -> str:
    """Fixed-width text: a metric per row, a model per column, then one line per
    pairwise comparison. Plain text, so ``print`` and ``rich.print`` both show it."""
    models = _models(summary)
    keys = _ordered_metric_keys(models)
    parts = []
    kind_rows = _kind_rows(models)
    if kind_rows:
        rows = [["kind", "metric", *(m["name"] for m in models)]]
        rows += [[kind, _label(key), *(format_metric(m["by_kind"].get(kind, {}).get(key)) for m in models)]
                 for kind, key in kind_rows]
        parts.append(_fixed_width(rows))
        parts += [f"{r['model_a']} vs {r['model_b']} by kind: {_pairwise_kind_text(r)}"
                  for r in _pairwise(summary) if r.get("by_kind")]
    if models and keys:
        rows = [["metric", *(m["name"] for m in models)]]
        rows += [[_label(k), *(format_metric(m["metrics"].get(k)) for m in models)] for k in keys]
        parts.append(_fixed_width(rows))
    for r in _pairwise(summary):
        judge = f" ({r['judge']})" if r["judge"] else ""
        parts.append(
            f"{r['model_a']} vs {r['model_b']}{judge}: W/T/L {r['wins']}/{r['ties']}/{r['losses']}, "
            f"adjusted win rate {format_metric(r['win_rate'])}, "
            f"at least as good {format_metric(r['at_least_as_good'])}, "
            f"sign test p = {_format_pvalue(r['sign_test_pvalue'])}"
            + (f"\n  warning: {r['warning']}" if r.get("warning") else "")
        )
    return "\n\n".join(parts) if parts else "(no metrics)"
