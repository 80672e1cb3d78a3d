"""Agreement statistics against textbook examples, with the arithmetic written out."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignkit.feedback.agreement import fleiss_kappa, krippendorff_alpha, project_agreement
from alignkit.feedback.storage import ItemRecord, LabelRecord

nan = np.nan


def test_krippendorff_binary_two_coders_by_hand():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section A:
    # two coders, ten units, values 0/1.
    data = [
        [0, 1, 0, 0, 0, 0, 0, 0, 1, 0],
        [1, 1, 1, 0, 0, 1, 0, 0, 0, 0],
    ]
    # Coincidences (each unit contributes both ordered pairs):
    #   units agreeing on 0: 4, 5, 7, 8, 10 -> o_00 = 2 * 5 = 10
    #   units agreeing on 1: 2             -> o_11 = 2 * 1 = 2
    #   disagreeing units: 1, 3, 6, 9      -> o_01 = o_10 = 4
    # n_0 = 14, n_1 = 6, n = 20
    # D_o = (o_01 + o_10) / n = 8 / 20 = 0.4
    # D_e = (n_0 n_1 + n_1 n_0) / (n (n - 1)) = 168 / 380 = 0.442105...
    # alpha = 1 - 0.4 / 0.442105 = 1 - 0.904762 = 0.095238
    assert krippendorff_alpha(data, "nominal") == pytest.approx(1 - 0.4 / (168 / 380))
    assert krippendorff_alpha(data, "nominal") == pytest.approx(0.095238, abs=1e-6)


# Krippendorff (2011), section C: four coders, twelve units, values 1-5, gaps.
RELIABILITY_DATA = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3],
    [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan],
]


@pytest.mark.parametrize(("level", "published"), [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)])
def test_krippendorff_textbook_example_with_missing_values(level, published):
    # Unit 12 has one value and is not pairable; n = 40 pairable values.
    assert krippendorff_alpha(RELIABILITY_DATA, level) == pytest.approx(published, abs=5e-4)


def test_krippendorff_nominal_by_hand_on_the_textbook_example():
    # Value totals over pairable units: n_1 = 9, n_2 = 13, n_3 = 10, n_4 = 5, n_5 = 3; n = 40.
    # Off-diagonal coincidences (disagreements), summed over c != k:
    #   unit 2 (values 2,2,3,2; m=4): pairs 2-3 and 3-2: 2 * 3 * 1 / 3 = 2
    #   unit 6 (1,2,3,4; m=4): every value once: 4 * 3 / 3 = 4
    #   unit 8 (1,1,2,1; m=4): 2 * 3 * 1 / 3 = 2
    #   total off-diagonal mass = 8 -> D_o = 8 / 40 = 0.2
    # D_e = (n^2 - sum n_c^2) / (n (n - 1)) = (1600 - (81+169+100+25+9)) / 1560 = 1216 / 1560
    # alpha = 1 - 0.2 / (1216 / 1560) = 0.743421
    assert krippendorff_alpha(RELIABILITY_DATA, "nominal") == pytest.approx(1 - 0.2 / (1216 / 1560))


def test_krippendorff_perfect_agreement_is_one_and_no_variation_is_nan():
    assert krippendorff_alpha([[1, 2, 3], [1, 2, 3]], "ordinal") == pytest.approx(1.0)
    assert math.isnan(krippendorff_alpha([[1, 1], [1, 1]], "nominal"))  # D_e = 0
    assert math.isnan(krippendorff_alpha([[1, nan], [nan, 2]], "nominal"))  # nothing pairable


def test_fleiss_kappa_textbook_example():
    # Fleiss (1971) style worked example (as on Wikipedia): 10 subjects, 14 raters, 5 categories.
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    # P_i = (sum_j n_ij^2 - 14) / (14 * 13); e.g. subject 2: (4+36+16+4 - 14) / 182 = 0.253
    # P_bar = 0.378; p_j = column sums / 140 = [20, 28, 39, 21, 32] / 140
    # P_e = sum p_j^2 = 0.213; kappa = (0.378 - 0.213) / (1 - 0.213) = 0.210
    p_i = [(sum(x * x for x in row) - 14) / 182 for row in table]
    p_bar = sum(p_i) / 10
    p_e = sum((c / 140) ** 2 for c in [20, 28, 39, 21, 32])
    assert fleiss_kappa(table) == pytest.approx((p_bar - p_e) / (1 - p_e))
    assert fleiss_kappa(table) == pytest.approx(0.210, abs=5e-4)


def test_fleiss_kappa_small_table_by_hand():
    # Three subjects, two raters each: agree, agree, disagree.
    # P_i = 1, 1, 0 -> P_bar = 2/3; p = (3/6, 3/6) -> P_e = 1/2; kappa = (2/3 - 1/2) / (1/2) = 1/3
    assert fleiss_kappa([[2, 0], [0, 2], [1, 1]]) == pytest.approx(1 / 3)


def test_project_agreement_ranking_and_pairwise():
    def item(*labels):
        return ItemRecord("x", "p", ["a", "b", "c"], {}, list(labels))

    same = [item(LabelRecord("u", [1, 2, 3], False, None), LabelRecord("v", [1, 2, 3], False, None)),
            item(LabelRecord("u", [3, 2, 1], False, None), LabelRecord("v", [3, 2, 1], False, None),
                 LabelRecord("w", None, True, None))]  # the can't-rank flag adds no values
    assert project_agreement("ranking", same)["krippendorff_alpha_ordinal"] == 1.0

    def pair(*winners):
        return ItemRecord("x", "p", ["a", "b"], {}, [LabelRecord(f"u{i}", None, False, w) for i, w in enumerate(winners)])

    result = project_agreement("pairwise", [pair("model_a", "model_a"), pair("model_b", "model_b"), pair("model_a", "tie")])
    # Counts per item over (model_a, model_b, tie, both_bad): [2,0,0,0], [0,2,0,0], [1,0,1,0]
    # P_bar = 2/3; p = (3/6, 2/6, 1/6, 0) -> P_e = (9 + 4 + 1) / 36 = 14/36; kappa = (2/3 - 14/36) / (22/36) = 10/22
    assert result["fleiss_kappa"] == pytest.approx(10 / 22, abs=1e-4)
    assert result["items_with_2plus_labels"] == 3
