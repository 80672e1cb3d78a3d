"""Inter-annotator agreement: Krippendorff's alpha and Fleiss' kappa.

- Krippendorff's alpha (Krippendorff 2011, "Computing Krippendorff's
  Alpha-Reliability"): alpha = 1 - D_o / D_e, from the coincidence matrix of
  values that pairs of coders gave the same unit. It takes any number of coders,
  missing values, and a distance metric per level of measurement: nominal
  (pairwise choices) and ordinal (ranks).
- Fleiss' kappa (Fleiss 1971): kappa = (P_bar - P_e) / (1 - P_e) over
  subjects x categories counts. With a different number of raters per subject,
  P_i uses that subject's own n_i (the usual generalisation; for a constant n it
  is exactly Fleiss' formula).

How a project becomes reliability data:

- ranking: a unit is (item, completion), the value is the rank a labeler gave
  it; "can't rank" counts as no value. Ordinal alpha then asks whether labelers
  put the same completions high and low. (The K ranks of one item are not
  independent, so read it as a summary, not a test statistic.)
- pairwise: a unit is an item, the value is the labeler's choice in real model
  terms (model_a / model_b / tie / both_bad): nominal alpha and Fleiss' kappa.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from alignkit.feedback.storage import WINNERS

LEVELS = ("nominal", "ordinal", "interval")


def krippendorff_alpha(data: Sequence[Sequence[float]] | np.ndarray, level: str = "nominal") -> float:
    """Alpha for a ``(coders, units)`` array of numeric values, NaN = missing.

    Units with fewer than two values are not pairable and drop out. Returns NaN
    when there is nothing to compare or every pairable value is the same (D_e = 0).

    >>> round(krippendorff_alpha([[0, 1, 0, 0, 0, 0, 0, 0, 1, 0],
    ...                           [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]]), 3)
    0.095
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    data = np.asarray(data, dtype=float)
    if data.ndim != 2:
        raise ValueError("data must be a (coders, units) array")
    values = np.unique(data[~np.isnan(data)])
    if values.size == 0:
        return float("nan")
    # counts[u, c]: how many coders gave unit u the value values[c]
    counts = np.stack([(data == v).sum(axis=0) for v in values], axis=1).astype(float)
    m_u = counts.sum(axis=1)
    pairable = m_u >= 2
    counts, m_u = counts[pairable], m_u[pairable]
    if counts.shape[0] == 0:
        return float("nan")

    # Coincidences o_ck = sum_u n_uc * (n_uk - [c == k]) / (m_u - 1)
    weighted = counts / (m_u - 1)[:, None]
    o = weighted.T @ counts - np.diag(weighted.sum(axis=0))
    n_c = o.sum(axis=1)
    n = n_c.sum()

    delta2 = _metric(values, n_c, level)
    d_observed = (o * delta2).sum() / n
    d_expected = (np.outer(n_c, n_c) * delta2).sum() / (n * (n - 1))
    if d_expected == 0:
        return float("nan")
    return float(1.0 - d_observed / d_expected)


def _metric(values: np.ndarray, n_c: np.ndarray, level: str) -> np.ndarray:
    """Squared distance delta^2(c, k) between the sorted values c and k."""
    v = len(values)
    if level == "nominal":
        return 1.0 - np.eye(v)
    if level == "interval":
        return (values[:, None] - values[None, :]) ** 2
    # ordinal: (sum_{g=c}^{k} n_g - (n_c + n_k) / 2)^2, the mass between c and k
    cum = np.concatenate([[0.0], np.cumsum(n_c)])
    lo = np.minimum.outer(np.arange(v), np.arange(v))
    hi = np.maximum.outer(np.arange(v), np.arange(v))
    between = cum[hi + 1] - cum[lo]
    return (between - (n_c[:, None] + n_c[None, :]) / 2) ** 2


def fleiss_kappa(counts: Sequence[Sequence[int]] | np.ndarray) -> float:
    """Kappa for a ``(subjects, categories)`` table of how many raters chose each.

    Subjects with fewer than two ratings drop out. NaN when there is nothing to
    compare or every rating falls in one category (P_e = 1).

    >>> round(fleiss_kappa([[2, 0], [0, 2], [1, 1]]), 4)  # P_bar = 2/3, P_e = 1/2
    0.3333
    """
    counts = np.asarray(counts, dtype=float)
    if counts.ndim != 2:
        raise ValueError("counts must be a (subjects, categories) table")
    n_i = counts.sum(axis=1)
    counts, n_i = counts[n_i >= 2], n_i[n_i >= 2]
    if counts.shape[0] == 0:
        return float("nan")
    p_i = ((counts**2).sum(axis=1) - n_i) / (n_i * (n_i - 1))  # agreement on subject i
    p_bar = p_i.mean()
    p_j = counts.sum(axis=0) / n_i.sum()  # share of all ratings in category j
    p_e = (p_j**2).sum()
    if p_e == 1:
        return float("nan")
    return float((p_bar - p_e) / (1 - p_e))


# ---------------------------------------------------------------------------
# from a project's labels


def ranking_reliability(records) -> np.ndarray:
    """``(labelers, items x completions)`` ranks, NaN where a labeler gave none."""
    labelers = sorted({lab.labeler for r in records for lab in r.labels})
    row = {name: i for i, name in enumerate(labelers)}
    columns = []
    for r in records:
        block = np.full((len(labelers), len(r.completions)), np.nan)
        for lab in r.labels:
            if not lab.cant_rank and lab.ranks is not None:
                block[row[lab.labeler]] = lab.ranks
        columns.append(block)
    if not columns or not labelers:
        return np.empty((0, 0))
    return np.concatenate(columns, axis=1)


def pairwise_counts(records, categories: Sequence[str]) -> np.ndarray:
    """``(items, categories)`` counts of the labelers' choices."""
    index = {c: j for j, c in enumerate(categories)}
    counts = np.zeros((len(records), len(categories)))
    for i, r in enumerate(records):
        for lab in r.labels:
            if lab.winner in index:
                counts[i, index[lab.winner]] += 1
    return counts


def project_agreement(kind: str, records) -> dict:
    """The agreement figures shown to the admin and written by the export."""
    n_multi = sum(1 for r in records if len(r.labels) >= 2)
    if kind == "ranking":
        data = ranking_reliability(records)
        alpha = krippendorff_alpha(data, "ordinal") if data.size else float("nan")
        return {"krippendorff_alpha_ordinal": _json_float(alpha), "items_with_2plus_labels": n_multi}
    counts = pairwise_counts(records, WINNERS)
    # Nominal alpha from the counts: each labeler is one "coder" slot per item.
    max_raters = int(counts.sum(axis=1).max()) if len(records) else 0
    data = np.full((max(max_raters, 1), len(records)), np.nan)
    for u, row in enumerate(counts):
        values = np.repeat(np.arange(len(WINNERS)), row.astype(int))
        data[: len(values), u] = values
    alpha = krippendorff_alpha(data, "nominal") if len(records) else float("nan")
    kappa = fleiss_kappa(counts) if len(records) else float("nan")
    return {
        "krippendorff_alpha_nominal": _json_float(alpha),
        "fleiss_kappa": _json_float(kappa),
        "items_with_2plus_labels": n_multi,
    }


def _json_float(x: float) -> float | None:
    return None if np.isnan(x) else round(float(x), 4)
