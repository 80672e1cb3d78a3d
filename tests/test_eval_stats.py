"""Evaluation statistics against hand-computed values (arithmetic in the tests)."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

from alignkit.eval import stats as eval_stats
from alignkit.eval.stats import (
    WinTieLoss,
    distinct_n,
    expected_max_toxicity,
    mean_ci,
    paired_difference_ci,
    pairwise_accuracy,
    toxicity_summary,
    win_tie_loss,
)


def test_doctests():
    result = doctest.testmod(eval_stats)
    assert result.attempted >= 2 and result.failed == 0


# --- toxicity ---------------------------------------------------------------


def test_toxicity_summary_mean_std_and_relative_improvement():
    # mean = (0.1 + 0.2 + 0.3 + 0.4) / 4 = 0.25
    # deviations -0.15, -0.05, 0.05, 0.15 -> squares 0.0225, 0.0025, 0.0025, 0.0225
    # population variance = 0.05 / 4 = 0.0125 -> std = sqrt(0.0125) = 0.111803...
    # relative improvement vs 0.5: (0.5 - 0.25) / 0.5 = 0.5
    # std improvement vs 0.2: (0.2 - 0.111803) / 0.2 = 0.440983
    summary = toxicity_summary([0.1, 0.2, 0.3, 0.4], baseline_mean=0.5, baseline_std=0.2)
    assert summary.n == 4
    assert summary.mean == pytest.approx(0.25)
    assert summary.std == pytest.approx(math.sqrt(0.0125))
    assert summary.relative_improvement == pytest.approx(0.5)
    assert summary.std_relative_improvement == pytest.approx((0.2 - math.sqrt(0.0125)) / 0.2)


def test_toxicity_summary_reference_numbers_from_the_mission():
    # GPT-J on RealToxicityPrompts: SFT 0.134 -> RLHF 0.129.
    # (0.134 - 0.129) / 0.134 = 0.005 / 0.134 = 0.0373134...
    summary = toxicity_summary(np.full(1000, 0.129), baseline_mean=0.134)
    assert summary.relative_improvement == pytest.approx(0.005 / 0.134)
    # a worse model gives a negative improvement: (0.1 - 0.2) / 0.1 = -1
    assert toxicity_summary([0.2, 0.2], baseline_mean=0.1).relative_improvement == pytest.approx(-1.0)


def test_toxicity_summary_without_baseline():
    summary = toxicity_summary(np.array([0.3]))
    assert summary.relative_improvement is None and summary.baseline_mean is None
    assert toxicity_summary([0.3], baseline_mean=0.0).relative_improvement is None  # 0/0 undefined


def test_expected_max_toxicity_hand_computed():
    scores = [
        [0.1, 0.6, 0.2],  # max 0.6 -> toxic
        [0.3, 0.2, 0.4],  # max 0.4
        [0.9, 0.1, 0.5],  # max 0.9 -> toxic
        [0.5, 0.0, 0.1],  # max 0.5 -> toxic (>= 0.5 counts)
    ]
    # maxima 0.6, 0.4, 0.9, 0.5: mean = 2.4 / 4 = 0.6
    # deviations 0, -0.2, 0.3, -0.1 -> squares 0, 0.04, 0.09, 0.01 -> var 0.14 / 4 = 0.035
    # share of prompts with a sample >= 0.5: 3 / 4 = 0.75
    result = expected_max_toxicity(scores)
    assert (result.n_prompts, result.k) == (4, 3)
    assert result.expected_max == pytest.approx(0.6)
    assert result.expected_max_std == pytest.approx(math.sqrt(0.035))
    assert result.toxicity_probability == pytest.approx(0.75)
    # a stricter threshold: only 0.9 >= 0.7 -> 1 / 4
    assert expected_max_toxicity(scores, threshold=0.7).toxicity_probability == pytest.approx(0.25)


def test_expected_max_toxicity_rejects_flat_input():
    with pytest.raises(ValueError, match=r"\(P, k\)"):
        expected_max_toxicity([0.1, 0.2])


# --- intervals --------------------------------------------------------------


def test_mean_ci_t_interval_hand_computed():
    # values 1..5: mean 3, sample variance (4 + 1 + 0 + 1 + 4) / 4 = 2.5
    # sem = sqrt(2.5 / 5) = sqrt(0.5) = 0.707107
    # t_{0.975, df=4} = 2.776445 -> half width 2.776445 * 0.707107 = 1.963243
    # interval [3 - 1.963243, 3 + 1.963243] = [1.036757, 4.963243]
    result = mean_ci([1, 2, 3, 4, 5], method="t")
    assert result.mean == pytest.approx(3.0)
    assert result.low == pytest.approx(3 - 2.776445 * math.sqrt(0.5), abs=1e-5)
    assert result.high == pytest.approx(3 + 2.776445 * math.sqrt(0.5), abs=1e-5)
    assert result.method == "t"


def test_mean_ci_bootstrap_agrees_with_t_on_normal_data_and_is_seeded():
    rng = np.random.default_rng(123)
    values = rng.normal(0.13, 0.05, size=400)
    # t half width ~ 1.966 * 0.05 / sqrt(400) = 0.0049; the bootstrap should match
    # it to a fraction of that.
    boot = mean_ci(values, method="bootstrap", seed=0)
    t = mean_ci(values, method="t")
    assert boot.method == "bootstrap-bca"
    assert boot.low < boot.mean < boot.high
    assert boot.low == pytest.approx(t.low, abs=0.001)
    assert boot.high == pytest.approx(t.high, abs=0.001)
    assert mean_ci(values, seed=0) == boot  # same seed, same interval


def test_mean_ci_degenerate_inputs():
    constant = mean_ci([0.2, 0.2, 0.2])  # nothing to resample: interval is the value
    assert (constant.low, constant.high) == (0.2, 0.2)
    single = mean_ci([0.2])
    assert single.mean == 0.2 and math.isnan(single.low) and math.isnan(single.high)
    with pytest.raises(ValueError, match="method"):
        mean_ci([1.0, 2.0], method="wald")


def test_paired_difference_hand_computed():
    before = np.array([0.5, 0.6, 0.7, 0.8, 0.9])
    after = before - np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    # differences after - before = -0.1, -0.2, -0.3, -0.4, -0.5: mean -1.5 / 5 = -0.3
    # Wilcoxon: all 5 signs negative, W+ = 0; exact two-sided p = 2 * (1 / 2^5) = 0.0625
    result = paired_difference_ci(before, after)
    assert result.n == 5
    assert result.mean_before == pytest.approx(0.7)
    assert result.mean_after == pytest.approx(0.4)
    assert result.mean_difference == pytest.approx(-0.3)
    assert result.wilcoxon_pvalue == pytest.approx(2 / 2**5)
    # every resample mean lies between the extreme differences
    assert -0.5 - 1e-12 <= result.low < -0.3 < result.high <= -0.1 + 1e-12


def test_paired_difference_no_change():
    result = paired_difference_ci([0.1, 0.2, 0.3], [0.1, 0.2, 0.3])
    assert result.mean_difference == 0.0
    assert (result.low, result.high) == (0.0, 0.0)
    assert result.wilcoxon_pvalue == 1.0
    with pytest.raises(ValueError, match="paired"):
        paired_difference_ci([0.1, 0.2], [0.1])


# --- win / tie / loss -------------------------------------------------------


def test_win_tie_loss_reference_example():
    # Human evaluation of 100 held-out prompts, RLHF vs SFT: 30 wins, 54 ties, 16 losses.
    result = win_tie_loss(30, 54, 16)
    assert result.n == 100

    # adjusted win rate: (30 + 54 / 2) / 100 = 57 / 100 = 0.57
    assert result.win_rate == pytest.approx(0.57)
    # bootstrap interval ~ normal approximation: item values 1 (x30), 0.5 (x54), 0 (x16)
    # E[x^2] = (30 * 1 + 54 * 0.25) / 100 = 0.435; var = 0.435 - 0.57^2 = 0.1101
    # se = sqrt(0.1101 / 100) = 0.03318 -> 0.57 +/- 1.96 * 0.03318 = [0.505, 0.635]
    assert result.win_rate_low == pytest.approx(0.57 - 1.96 * math.sqrt(0.1101 / 100), abs=0.01)
    assert result.win_rate_high == pytest.approx(0.57 + 1.96 * math.sqrt(0.1101 / 100), abs=0.01)

    # at least as good: (30 + 54) / 100 = 0.84
    assert result.at_least_as_good == pytest.approx(0.84)
    # Wilson, z = 1.959964, n = 100, p = 0.84:
    #   denominator 1 + z^2/n = 1.038415
    #   centre (0.84 + z^2/(2n)) / 1.038415 = (0.84 + 0.019207) / 1.038415 = 0.827422
    #   half width z / 1.038415 * sqrt(0.84 * 0.16 / 100 + z^2 / (4 n^2))
    #            = 1.887476 * sqrt(0.001344 + 0.000096) = 1.887476 * 0.037948 = 0.071625
    #   interval [0.755797, 0.899047]
    z = 1.959964
    denominator = 1 + z**2 / 100
    centre = (0.84 + z**2 / 200) / denominator
    half = z / denominator * math.sqrt(0.84 * 0.16 / 100 + z**2 / (4 * 100**2))
    assert result.at_least_as_good_low == pytest.approx(centre - half, abs=1e-5)
    assert result.at_least_as_good_high == pytest.approx(centre + half, abs=1e-5)
    assert result.at_least_as_good_low == pytest.approx(0.756, abs=5e-4)
    assert result.at_least_as_good_high == pytest.approx(0.899, abs=5e-4)

    # sign test on the 30 + 16 = 46 untied items, H0 p = 1/2, two-sided:
    #   p = 2 * P(X <= 16 | Binomial(46, 0.5)) = 2 * sum_{i<=16} C(46, i) / 2^46 = 0.05408
    tail = sum(math.comb(46, i) for i in range(17)) / 2**46
    assert result.sign_test_pvalue == pytest.approx(2 * tail)
    assert result.sign_test_pvalue == pytest.approx(0.054, abs=5e-4)

    # shares for the stacked bars: 0.30 / 0.54 / 0.16
    assert (result.win_share, result.tie_share, result.loss_share) == pytest.approx((0.30, 0.54, 0.16))


def test_win_tie_loss_from_outcomes_matches_counts():
    outcomes = ["win"] * 3 + ["tie"] * 2 + ["loss"]
    # adjusted (3 + 2/2) / 6 = 4/6; at least as good (3 + 2) / 6 = 5/6
    # sign test: 3 wins of 4 decided, p = 2 * P(X >= 3) = 2 * (4 + 1) / 16 = 0.625
    result = WinTieLoss.from_outcomes(outcomes)
    assert result == win_tie_loss(3, 2, 1)
    assert result.win_rate == pytest.approx(4 / 6)
    assert result.at_least_as_good == pytest.approx(5 / 6)
    assert result.sign_test_pvalue == pytest.approx(0.625)
    with pytest.raises(ValueError, match="outcome 1"):
        WinTieLoss.from_outcomes(["win", "draw"])


def test_win_tie_loss_edge_cases():
    all_ties = win_tie_loss(0, 5, 0)
    assert all_ties.win_rate == 0.5 and (all_ties.win_rate_low, all_ties.win_rate_high) == (0.5, 0.5)
    assert all_ties.sign_test_pvalue == 1.0  # nothing decided, no evidence either way
    empty = win_tie_loss(0, 0, 0)
    assert empty.n == 0 and math.isnan(empty.win_rate)
    with pytest.raises(ValueError, match="wins"):
        win_tie_loss(-1, 0, 0)


# --- diversity, reward-model accuracy ---------------------------------------


def test_distinct_n_hand_computed():
    texts = ["the cat sat", "The cat ran"]
    # unigrams: the cat sat the cat ran -> 6 total, {the, cat, sat, ran} -> 4 unique
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 4 total, 3 unique
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    # n-grams do not cross text boundaries: trigrams (the cat sat) (the cat ran) -> 2 / 2
    assert distinct_n(texts, 3) == pytest.approx(1.0)
    # a collapsed policy: "ok ok ok ok" -> 4 unigrams, 1 unique
    assert distinct_n(["ok ok", "OK  ok"], 1) == pytest.approx(1 / 4)
    assert distinct_n(["one"], 2) == 0.0  # no bigrams at all
    with pytest.raises(ValueError):
        distinct_n(texts, 0)


def test_pairwise_accuracy_counts_ties_wrong():
    # 1 > 0 right, 2 = 2 tie (wrong), 3 < 4 wrong, 4 > 1 right -> 2 / 4
    assert pairwise_accuracy([1, 2, 3, 4], [0, 2, 4, 1]) == pytest.approx(0.5)
    assert pairwise_accuracy(np.zeros(3), np.zeros(3)) == 0.0  # constant RM scores 0, not 0.5
    with pytest.raises(ValueError, match="paired"):
        pairwise_accuracy([1, 2], [1])
