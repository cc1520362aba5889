"""Audited trust and the label-rate controller (select.py, beyond the paper): pure logic on hand-made scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from actprm_ray.pipeline.stages import SelectStage, audit_results
from actprm_ray.select import (RateController, audit_candidates, is_uncertain, uncertainty_score,
                               wilson_interval)

DP, DS = 0.95, 0.005


# -- u(s): one number that moves both thresholds ------------------------------------------------------------------


def test_score_by_hand():
    # max(µ,1-µ) = 0.90 -> (1 - 0.90)/(1 - 0.95) = 2; σ 0.0025/0.005 = 0.5; the larger wins.
    assert uncertainty_score([0.9], [0.0025], delta_pred=DP, delta_std=DS) == pytest.approx(2.0)
    # σ dominates: 0.02/0.005 = 4 > (1-0.99)/0.05 = 0.2
    assert uncertainty_score([0.99], [0.02], delta_pred=DP, delta_std=DS) == pytest.approx(4.0)
    # Only C(s) counts: the step after the predicted first error (σ = 0.3) is ignored.
    assert uncertainty_score([0.99, 0.02, 0.6], [0.001, 0.001, 0.3]) == pytest.approx(max(0.2, 0.4))
    assert uncertainty_score([0.99], [float("nan")]) == math.inf
    assert uncertainty_score([], []) == 0.0


def test_score_at_one_is_the_paper_rule():
    # Exact binary values: u <= 1 iff trusted, on both sides of both thresholds.
    t = dict(delta_pred=0.75, delta_std=0.125)
    for mu, sd in [([0.75], [0.125]), ([0.75 - 2**-20], [0.0]), ([0.75], [0.125 + 2**-20]), ([0.25], [0.0]),
                   ([1.0, 0.8], [0.0, 0.1]), ([0.9, 0.3, 0.5], [0.0, 0.0, 0.5])]:
        assert (uncertainty_score(mu, sd, **t) > 1.0) == is_uncertain(mu, sd, **t), (mu, sd)


def test_score_agrees_with_rule_on_random_rows():
    rng = np.random.default_rng(0)
    for _ in range(500):
        m = rng.uniform(0, 1, rng.integers(1, 6)).tolist()
        s = rng.uniform(0, 0.02, len(m)).tolist()
        assert (uncertainty_score(m, s) > 1.0) == is_uncertain(m, s)


def test_zero_threshold_means_any_uncertainty_counts():
    assert uncertainty_score([0.99], [0.0], delta_pred=1.0, delta_std=0.0) == math.inf
    assert uncertainty_score([1.0], [0.0], delta_pred=1.0, delta_std=0.0) == 0.0


# -- audits ---------------------------------------------------------------------------------------------------------


def test_audit_draw_share_and_independence_from_random_mode():
    ids = [str(i) for i in range(20000)]
    picked = audit_candidates(ids, 0.02, seed=0)
    assert abs(picked.mean() - 0.02) < 5 * math.sqrt(0.02 * 0.98 / len(ids))
    assert audit_candidates(ids[:100][::-1], 0.02)[::-1].tolist() == picked[:100].tolist()
    assert not audit_candidates(ids, 0.0).any()


def test_select_stage_audits_only_trusted_valid_rows():
    n = 400
    batch = {"id": [f"r{i}" for i in range(n)], "valid": [i % 4 != 3 for i in range(n)],
             "step_mean": [[0.99] if i % 2 else [0.6] for i in range(n)],  # odd rows trusted, even uncertain
             "step_std": [[0.0] for _ in range(n)]}
    out = SelectStage(mode="active", delta_pred=DP, delta_std=DS, step_threshold=0.5, random_rate=0.5, seed=0,
                      audit_rate=0.5)(batch)
    audit, selected, valid = out["audit"], out["selected"], np.asarray(batch["valid"])
    trusted = np.array([i % 2 == 1 for i in range(n)]) & valid
    assert not (audit & ~trusted).any()  # never an uncertain or invalid row
    assert (selected == (valid & ~trusted) | audit).all()  # audited rows are labelled (and so paid)
    assert 0.3 < audit[trusted].mean() < 0.7
    assert not out["uncertain"][audit].any()  # an audited row stays "trusted": it is the audit's sample
    off = SelectStage(mode="active", delta_pred=DP, delta_std=DS, step_threshold=0.5, random_rate=0.5, seed=0)(batch)
    assert not off["audit"].any()


def test_audit_results_compare_pseudo_label_with_judge():
    batch = {"id": ["a", "b", "c", "d"], "audit": [True, True, True, False],
             "step_mean": [[0.9, 0.2], [0.9, 0.8], [0.9, 0.2], [0.9]],
             "hard_labels": [[1, 0], [1, 0], [], [1]], "label_status": ["ok", "ok", "failed", "ok"]}
    # a: pseudo [1,0] == judge [1,0]; b: pseudo [1,1] != [1,0]; c: no label; d: not audited
    assert audit_results(batch) == [True, False]


def test_wilson_interval_by_hand():
    low, high = wilson_interval(8, 10)  # textbook: 0.490 .. 0.943
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == pytest.approx(1.0)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


# -- the controller -------------------------------------------------------------------------------------------------


def run_controller(c: RateController, scores: np.ndarray, batch: int = 8, truth=None) -> np.ndarray:
    chosen = []
    for i in range(0, len(scores), batch):
        rows = range(i, min(i + batch, len(scores)))
        # With a truth, one row in 10 is an audit candidate (audit_rate 0.1); without, no audits.
        sel, audit = c.decide(scores[i:i + batch], [truth is not None and j % 10 == 0 for j in rows])
        if truth is not None:
            c.record_audits([truth(j) for j, a in zip(rows, audit) if a])
        chosen.extend(sel)
    return np.asarray(chosen)


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5, 0.8])
def test_controller_holds_the_target_on_a_drifting_stream(target):
    # Scores shrink as a learning model grows confident: fixed thresholds would label less and less.
    rng = np.random.default_rng(1)
    scores = rng.lognormal(0.0, 1.0, 6000) * np.linspace(5.0, 0.2, 6000)
    c = RateController(target, window=256)
    chosen = run_controller(c, scores)
    assert abs(chosen.mean() - target) <= 0.05 * target  # within ±5% of the target over the pool
    assert abs(chosen[3000:].mean() - target) <= 0.1 * target  # and in the second half, not only on average
    fixed = (scores > 1.0).mean(), (scores[3000:] > 1.0).mean()
    assert fixed[1] < fixed[0] - 0.1  # the stream really drifts


def test_controller_picks_the_most_uncertain():
    scores = np.tile(np.arange(10, dtype=float), 200)
    chosen = run_controller(RateController(0.3, window=100), scores)
    late = slice(500, None)
    assert chosen[late][scores[late] >= 7].mean() > 0.95  # the top 3 of 10 score levels
    assert chosen[late][scores[late] <= 5].mean() < 0.05


def test_guard_trusts_nothing_while_audited_accuracy_is_below_the_floor():
    scores = np.random.default_rng(2).uniform(0.1, 0.9, 4000)  # everything looks confident (u < 1)
    c = RateController(0.2, window=128, accuracy_floor=0.8, min_audits=20, audit_window=100)
    wrong = run_controller(c, scores[:2000], truth=lambda j: (j // 10) % 2 == 0)  # half right
    assert c.guarded
    assert wrong[-500:].all()  # every row labelled once the guard is up
    assert c.guarded_rows > 1000
    # The model recovers: would-be-trusted rows are still audited while guarded, so the guard can lift.
    right = run_controller(c, scores[2000:], truth=lambda j: True)
    assert not c.guarded
    assert right[-500:].mean() < 0.5  # trusting again


def test_controller_validates_target():
    with pytest.raises(ValueError, match="target_rate"):
        RateController(0.0)
    with pytest.raises(ValueError, match="target_rate"):
        RateController(1.5)
