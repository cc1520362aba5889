"""Evaluation metrics and batching arithmetic on hand-computed cases (METHOD §9). Pure: no model, no Ray."""

import math

import pytest

from actprm_ray.eval import metrics as M
from actprm_ray.eval.batching import Scored, padding_stats, score_rows, sequential_batches, token_limit_reason
from actprm_ray.model.scoring import length_batches

# ---------------------------------------------------------------------------------------------------------------
# ProcessBench
# ---------------------------------------------------------------------------------------------------------------


def test_prediction_is_first_step_below_tau():
    assert M.first_error_prediction([0.9, 0.4, 0.1], 0.5) == 1
    assert M.first_error_prediction([0.9, 0.8], 0.5) == -1
    # µ == τ is not below τ: the step counts as correct.
    assert M.first_error_prediction([0.5, 0.49], 0.5) == 1
    assert M.first_error_prediction([0.5, 0.49], 0.45) == -1


def test_perfect_predictions_give_f1_one():
    labels = [2, 0, -1, -1, 1]
    mus = [[0.9, 0.8, 0.1, 0.9], [0.2, 0.9], [0.9, 0.9], [0.7], [0.6, 0.3, 0.2]]
    preds = [M.first_error_prediction(mu) for mu in mus]
    assert preds == labels
    m = M.first_error_metrics(labels, preds)
    assert (m["acc_err"], m["acc_cor"], m["f1"]) == (1.0, 1.0, 1.0)
    assert (m["n_err"], m["n_cor"]) == (3, 2)


def test_all_minus_one_scores_zero_on_the_error_set():
    labels = [3, 0, 1, -1, -1]
    m = M.first_error_metrics(labels, [-1] * 5)
    assert m["acc_err"] == 0.0  # every erroneous row missed
    assert m["acc_cor"] == 1.0  # every correct row right
    assert m["f1"] == 0.0  # harmonic mean with a zero


def test_off_by_one_is_a_miss():
    # label 2: predicting 1 (too early) or 3 (too late) are both misses; only 2 hits -> 1/3.
    m = M.first_error_metrics([2, 2, 2], [1, 3, 2])
    assert m["acc_err"] == pytest.approx(1 / 3)
    # A correct row predicted with any error index is a miss for acc_cor.
    assert M.first_error_metrics([-1, -1], [0, -1])["acc_cor"] == 0.5


def test_f1_hand_value_and_zero_case():
    # acc_err 1/2, acc_cor 3/4: F1 = 2 * (3/8) / (5/4) = 0.6
    labels = [0, 1, -1, -1, -1, -1]
    preds = [0, -1, -1, -1, -1, 2]
    m = M.first_error_metrics(labels, preds)
    assert (m["acc_err"], m["acc_cor"]) == (0.5, 0.75)
    assert m["f1"] == pytest.approx(0.6)
    assert M.f1_of_accuracies(0.0, 0.0) == 0.0


def test_headline_is_unweighted_mean_of_subset_f1():
    # Subset a: 2 rows, F1 = 1. Subset b: 6 rows, all wrong, F1 = 0. Unweighted mean = 0.5 (a row-weighted
    # mean would give 0.25).
    per_subset = {"a": ([1, -1], [1, -1]), "b": ([0, 0, 0, -1, -1, -1], [1, 1, 1, 0, 0, 0])}
    s = M.processbench_summary(per_subset)
    assert s["subsets"]["a"]["f1"] == 1.0 and s["subsets"]["b"]["f1"] == 0.0
    assert s["mean_f1"] == 0.5


def test_empty_side_is_flagged_not_nan():
    m = M.first_error_metrics([1, 2], [1, 2])
    assert m["acc_err"] == 1.0 and m["acc_cor"] == 0.0 and m["f1"] == 0.0
    assert m["undefined"] == ["acc_cor"]
    with pytest.raises(ValueError):
        M.first_error_metrics([1], [1, 2])


def test_threshold_curve_and_best_threshold():
    # One erroneous row (label 1) and one correct row. µ = [0.7, 0.3] / [0.6, 0.6].
    # τ=0.2: preds (-1, -1) -> acc_err 0, acc_cor 1 -> F1 0.
    # τ=0.5: preds (1, -1) -> 1, 1 -> F1 1.
    # τ=0.65: preds (1, 0) -> acc_cor 0 -> F1 0.   τ=0.8: preds (0, 0) -> F1 0.
    curve = M.threshold_curve({"s": ([1, -1], [[0.7, 0.3], [0.6, 0.6]])}, [0.2, 0.5, 0.65, 0.8])
    assert [p["f1"] for p in curve["s"]] == [0.0, 1.0, 0.0, 0.0]
    assert M.best_threshold(curve["s"])["tau"] == 0.5
    # Ties go to the τ nearest 0.5.
    tie = [{"tau": 0.3, "f1": 0.8}, {"tau": 0.45, "f1": 0.8}, {"tau": 0.9, "f1": 0.1}]
    assert M.best_threshold(tie)["tau"] == 0.45


# ---------------------------------------------------------------------------------------------------------------
# PRMBench
# ---------------------------------------------------------------------------------------------------------------


def test_step_validity_is_strictly_above_half():
    assert M.step_validity([0.51, 0.5, 0.49]) == [True, False, False]


def test_prmbench_pooled_vs_per_category_by_hand():
    """Worked on paper. Positive = correct step; error_steps are 1-based.

    s1 circular,  error_steps [3],      valid T F F T : step1 TP, step2 FN, step3 TN, step4 TP -> TP2 FN1 TN1 FP0
    s2 circular,  error_steps [2, 3, 9], valid T T F  : (9 is out of range, ignored) step1 TP, step2 FP, step3 TN
                                                                                              -> TP1 FP1 TN1 FN0
    s3 deception, error_steps [1],      valid T F    : step1 FP, step2 FN                    -> FP1 FN1
    s4 correct,   error_steps [],       valid F T    : step1 FN, step2 TP (own entry only)    -> TP1 FN1

    circular pooled TP3 FP1 TN2 FN1: F1_pos = 6/(6+1+1) = 3/4, F1_neg = 4/(4+1+1) = 2/3, PRMScore = 17/24
    deception       TP0 FP1 TN0 FN1: F1_pos = 0, F1_neg = 0, PRMScore = 0
    overall (s1-s3) TP3 FP2 TN2 FN2: F1_pos = 6/10 = 0.6, F1_neg = 4/8 = 0.5, PRMScore = 0.55
      (not the mean of the category scores, (17/24 + 0)/2 = 0.354: the overall pools steps.)
    correct         TP1 FN1: F1_pos = 2/3 -> score 2/3 (positive-only), and not part of the overall.
    groups: simplicity = circular = 17/24 (redundency absent), sensitivity = deception = 0, soundness = None.
    """
    samples = [
        ("circular", [3], [True, False, False, True]),
        ("circular", [2, 3, 9], [True, True, False]),
        ("deception", [1], [True, False]),
        ("correct", [], [False, True]),
    ]
    s = M.prmbench_summary(samples)
    circ = s["categories"]["circular"]
    assert (circ["tp"], circ["fp"], circ["tn"], circ["fn"]) == (3, 1, 2, 1)
    assert circ["f1_pos"] == pytest.approx(3 / 4)
    assert circ["f1_neg"] == pytest.approx(2 / 3)
    assert circ["score"] == pytest.approx(17 / 24)
    assert s["categories"]["deception"]["score"] == 0.0
    ov = s["overall"]
    assert (ov["tp"], ov["fp"], ov["tn"], ov["fn"]) == (3, 2, 2, 2)
    assert ov["f1_pos"] == pytest.approx(0.6)
    assert ov["f1_neg"] == pytest.approx(0.5)
    assert ov["prm_score"] == pytest.approx(0.55)
    assert s["categories"]["correct"]["score"] == pytest.approx(2 / 3)
    assert s["groups"]["simplicity"] == pytest.approx(17 / 24)
    assert s["groups"]["sensitivity"] == 0.0
    assert s["groups"]["soundness"] is None
    assert "redundency" in s["missing_categories"]


def test_multi_solutions_uses_f1_pos_only():
    # No gold errors: valid T F -> TP1 FN1 -> F1_pos = 2/3, F1_neg = 0. Score 2/3, not (2/3 + 0)/2.
    s = M.prmbench_summary([("multi_solutions", [], [True, False])])
    ms = s["categories"]["multi_solutions"]
    assert ms["f1_neg"] == 0.0
    assert ms["prm_score"] == pytest.approx(1 / 3)
    assert ms["score"] == pytest.approx(2 / 3)


def test_prmbench_curve_at_half_matches_summary():
    mus = [("circular", [2], [0.9, 0.2, 0.7]), ("deception", [1], [0.6, 0.4]), ("correct", [], [0.1])]
    curve = M.prmbench_threshold_curve(mus, [0.5])
    summary = M.prmbench_summary([(c, e, M.step_validity(m)) for c, e, m in mus])
    assert curve[0]["prm_score"] == pytest.approx(summary["overall"]["prm_score"])
    # Steps of circular+deception: TP (0.9, 0.7), TN (0.2), FP (0.6), FN (0.4) -> 3 of 5 right.
    assert curve[0]["step_acc"] == pytest.approx(3 / 5)


# ---------------------------------------------------------------------------------------------------------------
# Batching and padding
# ---------------------------------------------------------------------------------------------------------------


def test_padding_fraction_before_and_after_sorting():
    lengths = [10, 2, 9, 1]
    # In order, batch 2: [10, 2] -> 20 slots, 8 padded; [9, 1] -> 18 slots, 8 padded: 16/38.
    before = padding_stats(lengths, sequential_batches(4, 2))
    assert (before["padded"], before["total"]) == (16, 38)
    # Sorted: [10, 9] -> 20 slots, 1 padded; [2, 1] -> 4 slots, 1 padded: 2/24.
    batches = length_batches(lengths, 2)  # what score_encoded runs: longest first
    assert batches == [[0, 2], [1, 3]]
    after = padding_stats(lengths, batches)
    assert (after["padded"], after["total"]) == (2, 24)
    assert after["fraction"] == pytest.approx(2 / 24)
    assert padding_stats([], [])["fraction"] == 0.0


class _FakeScorer:
    """Scores step j of a row as (j + 1) / 10, with 10 tokens per step, in score_encoded's batches; records
    the rows and settings of each call."""

    sep = "<extra_0>"

    def __init__(self, mus=None):
        self.calls, self.mus = [], mus

    def __call__(self, rows, *, batch_size, max_tokens=None, progress=None):
        self.calls.append(([r["id"] for r in rows], batch_size, max_tokens))
        lengths = [len(r["steps"]) * 10 for r in rows]
        reasons = {j: why for j, n in enumerate(lengths) if (why := token_limit_reason(n, max_tokens))}
        keep = [j for j in range(len(rows)) if j not in reasons]
        mus = self.mus or [[(k + 1) / 10 for k in range(len(r["steps"]))] for r in rows]
        batches = [[keep[i] for i in b] for b in length_batches([lengths[j] for j in keep], batch_size)]
        return Scored([None if j in reasons else mus[j] for j in range(len(rows))], reasons, lengths, batches)


def test_score_rows_keeps_input_order_and_skips_unscorable_rows():
    rows = [
        {"id": "a", "question": "q", "steps": ["x"]},
        {"id": "bad", "question": "q", "steps": ["x", "   "]},  # empty after normalisation
        {"id": "b", "question": "q", "steps": ["x", "y", "z"]},
        {"id": "c", "question": "q", "steps": ["x", "y"]},
        {"id": "long", "question": "q", "steps": ["x"] * 5},  # 50 tokens > max_tokens
    ]
    scorer = _FakeScorer()
    res = score_rows(rows, scorer, batch_size=2, max_tokens=40)
    assert res.mus == [[0.1], None, [0.1, 0.2, 0.3], [0.1, 0.2], None]
    assert res.unscorable == [{"id": "bad", "reason": "step 1 is empty after normalisation"},
                              {"id": "long", "reason": "50 tokens exceed max_tokens=40"}]
    assert scorer.calls == [(["a", "b", "c", "long"], 2, 40)]  # one call: the scorer batches
    # lengths 10, 30, 20: in order [10, 30] + [20] -> 20 padded of 80; sorted [30, 20] + [10] -> 10 of 70.
    assert (res.padding_before["padded"], res.padding_before["total"]) == (20, 80)
    assert (res.padding_after["padded"], res.padding_after["total"]) == (10, 70)
    assert res.rows == 3 and res.steps == 6 and res.batches == 2 and res.summary()["unscorable"] == 2


def test_score_rows_rejects_a_scorer_with_the_wrong_shape():
    rows = [{"id": "a", "question": "q", "steps": ["x", "y"]}]
    with pytest.raises(RuntimeError, match="1 scores for 2 steps"):
        score_rows(rows, _FakeScorer(mus=[[0.5]]))
    with pytest.raises(RuntimeError, match="non-finite"):
        score_rows(rows, _FakeScorer(mus=[[0.5, math.nan]]))
    with pytest.raises(RuntimeError, match="unscored without a reason"):
        score_rows(rows, lambda rs, **_: Scored([None], {}, [20], []))
    with pytest.raises(RuntimeError, match="returned 0 rows"):
        score_rows(rows, lambda rs, **_: Scored([], {}, [], []))
