"""Selection rule (METHOD §4) on hand-worked cases: boundaries, C(s) cut, ablations, modes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from actprm_ray.select import (
    ablation_thresholds,
    considered_length,
    is_uncertain,
    is_uncertain_batch,
    predicted_first_error,
    pseudo_labels,
    random_draw,
    select_rows,
    uncertainty_kinds,
)

DP, DS = 0.95, 0.005  # METHOD defaults
BELOW_DP = math.nextafter(DP, 0.0)  # the largest float below δ_pred
ABOVE_DS = math.nextafter(DS, 1.0)  # the smallest float above δ_std


# -- boundaries: equality counts as trusted ---------------------------------------------------------------------


def test_defaults_are_method_values():
    # Called without thresholds, the defaults must be δ_pred = 0.95, δ_std = 0.005: µ just below 0.95 is selected,
    # µ = 0.95 is not; σ = 0.005 is trusted, just above is selected.
    assert not is_uncertain([0.95], [0.005])
    assert is_uncertain([BELOW_DP], [0.0])
    assert is_uncertain([0.99], [ABOVE_DS])


@pytest.mark.parametrize(
    "mu, sigma, selected",
    [
        ([DP], [DS], False),  # µ exactly at δ_pred, σ exactly at δ_std: trusted
        ([1.0 - DP], [DS], False),  # µ exactly at 1-δ_pred (a confident error): trusted
        ([BELOW_DP], [DS], True),  # just past δ_pred
        ([DP], [ABOVE_DS], True),  # just past δ_std
        ([0.0500001], [0.0], True),  # just above 1-δ_pred
        ([1.0], [0.0], False),
        ([0.0], [0.0], False),
        ([0.5], [0.0], True),  # a coin flip is aleatoric
    ],
)
def test_selection_boundaries(mu, sigma, selected):
    assert is_uncertain(mu, sigma, delta_pred=DP, delta_std=DS) is selected


def test_exact_binary_boundaries():
    # 0.75 / 0.25 / 0.125 are exact in binary, so no rounding can hide an off-by-one comparison.
    assert not is_uncertain([0.75, 0.25], [0.125, 0.125], delta_pred=0.75, delta_std=0.125)
    assert is_uncertain([0.75], [0.125 + 2**-20], delta_pred=0.75, delta_std=0.125)
    assert is_uncertain([0.75 - 2**-20], [0.0], delta_pred=0.75, delta_std=0.125)
    assert is_uncertain([0.25 + 2**-20], [0.0], delta_pred=0.75, delta_std=0.125)


def test_uncertainty_kinds_separately():
    assert uncertainty_kinds([0.99, 0.9], [0.0, 0.0]) == (True, False)  # 0.9 < 0.95
    assert uncertainty_kinds([0.99, 0.99], [0.0, 0.01]) == (False, True)  # 0.01 > 0.005
    assert uncertainty_kinds([0.9], [0.01]) == (True, True)
    assert uncertainty_kinds([0.99], [0.001]) == (False, False)


def test_nan_score_is_never_trusted():
    # A NaN µ or σ means the scorer broke; such a row must go to the judge, not be pseudo-labelled as trusted.
    assert is_uncertain([float("nan")], [0.0])
    assert is_uncertain([0.99], [float("nan")])


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 means but 1 stds"):
        is_uncertain([0.9, 0.9], [0.0])


# -- C(s): cut at the first µ < 0.5 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mu, first_error, considered",
    [
        ([0.99, 0.97, 0.20, 0.60], 2, 3),
        ([0.99, 0.98], -1, 2),  # no predicted error: all steps
        ([0.4, 0.99], 0, 1),
        ([0.99, 0.5, 0.3], 2, 3),  # µ = 0.5 is not below the threshold
        ([0.49999], 0, 1),
    ],
)
def test_predicted_first_error_and_considered_set(mu, first_error, considered):
    assert predicted_first_error(mu) == first_error
    assert considered_length(mu) == considered


def test_uncertain_step_inside_cut_selects():
    # METHOD worked example: C = {0, 1, 2}; max(µ, 1-µ) at step 2 is 0.80 < 0.95.
    assert is_uncertain([0.99, 0.97, 0.20, 0.60], [0.001] * 4)


def test_steps_after_the_cut_are_ignored():
    # E = 1 (µ = 0.02 is a confident error), so C = {0, 1}; step 2's µ = 0.6 and σ = 0.3 must not matter.
    assert not is_uncertain([0.99, 0.02, 0.60], [0.001, 0.001, 0.3])
    # The same step 2 inside C (no cut before it) selects the row.
    assert is_uncertain([0.99, 0.98, 0.60], [0.001, 0.001, 0.3])


def test_step_threshold_moves_the_cut():
    # δ_pred = 0.6. With τ = 0.7 the first error is step 0 (0.65 < 0.7), C = {0}, and max(0.65, 0.35) >= 0.6:
    # trusted. With τ = 0.5 there is no cut, step 1 is in C and max(0.55, 0.45) < 0.6: aleatoric.
    mu, sigma = [0.65, 0.55], [0.0, 0.0]
    assert predicted_first_error(mu, 0.7) == 0
    assert uncertainty_kinds(mu, sigma, delta_pred=0.6, step_threshold=0.7) == (False, False)
    assert uncertainty_kinds(mu, sigma, delta_pred=0.6, step_threshold=0.5) == (True, False)


# -- ablations --------------------------------------------------------------------------------------------------


def test_ablation_thresholds():
    assert ablation_thresholds("both") == {"delta_pred": 0.95, "delta_std": 0.005}
    assert ablation_thresholds("aleatoric_only") == {"delta_pred": 0.95, "delta_std": math.inf}
    assert ablation_thresholds("epistemic_only") == {"delta_pred": 0.5, "delta_std": 0.005}
    with pytest.raises(ValueError, match="unknown ablation"):
        ablation_thresholds("neither")


def test_aleatoric_only_ignores_spread():
    t = ablation_thresholds("aleatoric_only")
    assert not is_uncertain([0.99], [0.4], **t)  # huge σ, confident µ: trusted
    assert is_uncertain([0.7], [0.0], **t)


def test_epistemic_only_ignores_confidence():
    t = ablation_thresholds("epistemic_only")
    assert not is_uncertain([0.5], [0.0], **t)  # max(µ, 1-µ) >= 0.5 always holds
    assert not is_uncertain([0.7], [DS], **t)
    assert is_uncertain([0.99], [0.01], **t)


# -- batch form -------------------------------------------------------------------------------------------------


def test_batch_matches_row_by_row_on_ragged_rows():
    means = [[0.99, 0.97], [0.99, 0.97, 0.20, 0.60], [0.99], np.array([0.999, 0.01, 0.5])]
    stds = [[0.001, 0.001], [0.001] * 4, [0.01], np.array([0.0, 0.0, 0.4])]
    out = is_uncertain_batch(means, stds, delta_pred=DP, delta_std=DS)
    assert out.dtype == bool
    assert out.tolist() == [False, True, True, False]


# -- modes ------------------------------------------------------------------------------------------------------


def test_modes_active_all_none():
    ids = ["a", "b", "c"]
    unc = [True, False, True]
    assert select_rows("active", unc, ids).tolist() == [True, False, True]
    assert select_rows("all", unc, ids).tolist() == [True, True, True]
    assert select_rows("none", unc, ids).tolist() == [False, False, False]
    with pytest.raises(ValueError, match="unknown selection mode"):
        select_rows("topk", unc, ids)


def test_random_mode_is_deterministic_and_batch_independent():
    ids = [f"row-{i}" for i in range(200)]
    first = select_rows("random", [False] * 200, ids, random_rate=0.5, seed=3)
    again = select_rows("random", [True] * 200, ids, random_rate=0.5, seed=3)  # ignores uncertainty
    assert first.tolist() == again.tolist()
    # Split into two batches in reverse order: every row keeps its decision.
    parts = [select_rows("random", [False] * 100, ids[i : i + 100][::-1], random_rate=0.5, seed=3)[::-1] for i in (0, 100)]
    assert np.concatenate(parts).tolist() == first.tolist()
    other_seed = select_rows("random", [False] * 200, ids, random_rate=0.5, seed=4)
    assert other_seed.tolist() != first.tolist()


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.75])
def test_random_mode_rate(rate):
    n = 20000
    picked = select_rows("random", [False] * n, [str(i) for i in range(n)], random_rate=rate, seed=0)
    sd = math.sqrt(rate * (1 - rate) / n)  # binomial standard error of the observed share
    assert abs(picked.mean() - rate) < 5 * sd


def test_random_mode_extremes():
    ids = [str(i) for i in range(500)]
    assert not select_rows("random", [False] * 500, ids, random_rate=0.0).any()
    assert select_rows("random", [False] * 500, ids, random_rate=1.0).all()


def test_random_draw_is_uniform_in_unit_interval():
    draws = [random_draw(str(i), 0) for i in range(5000)]
    assert all(0.0 <= d < 1.0 for d in draws)
    assert random_draw("x", 1) == random_draw("x", 1)
    assert random_draw("x", 1) != random_draw("x", 2)
    # Uniform: mean 1/2 and variance 1/12 within a few standard errors.
    assert abs(np.mean(draws) - 0.5) < 5 * math.sqrt(1 / 12 / 5000)
    assert abs(np.var(draws) - 1 / 12) < 0.01


# -- pseudo-labels ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mu, labels",
    [([0.9, 0.4, 0.8], [1, 0]), ([0.9, 0.6], [1, 1]), ([0.5], [1]), ([0.1, 0.9], [0])],
)
def test_pseudo_labels(mu, labels):
    assert pseudo_labels(mu) == labels
