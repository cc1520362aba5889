"""Loss (METHOD §5): BCE normalisations, bootstrap mask, anchor regulariser, empty selection.

Expected values use the closed form ℓ(z, y) = log(1 + e^z) - y·z, written out here independently of torch.
"""

from __future__ import annotations

import math

import pytest
import torch

from actprm_ray.loss import actprm_loss, anchor_regularizer, bce_loss
from actprm_ray.model.ensemble_prm import StackedHeads


def ell(z: float, y: float) -> float:
    return math.log1p(math.exp(z)) - y * z


# 2 heads x 3 steps; row 0 owns steps 0 and 1, row 1 owns step 2.
LOGITS = [[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]]
LABELS = [1.0, 0.0, 1.0]
STEP_ROW = [0, 0, 1]


def tensors(selected):
    return (
        torch.tensor(LOGITS),
        torch.tensor(LABELS),
        torch.tensor(STEP_ROW),
        torch.tensor(selected),
    )


def hand_terms():
    """ℓ[k][i] for the example above, e.g. ℓ[0][0] = log 2 ≈ 0.6931, ℓ[1][0] = log(1+e²) - 2 ≈ 0.1269."""
    return [[ell(z, y) for z, y in zip(row, LABELS)] for row in LOGITS]


def test_hand_terms_sanity():
    t = hand_terms()
    assert t[0][0] == pytest.approx(0.693147, abs=1e-6)
    assert t[0][1] == pytest.approx(1.313262, abs=1e-6)
    assert t[1][0] == pytest.approx(0.126928, abs=1e-6)


def test_pooled_bce_all_rows():
    t = hand_terms()
    expected = sum(t[0] + t[1]) / 6  # 2 heads x 3 labelled steps
    assert bce_loss(*tensors([True, True])).item() == pytest.approx(expected, rel=1e-6)


def test_per_trajectory_bce_all_rows():
    t = hand_terms()
    # Mean over each row's steps, then over the 4 (head, row) pairs.
    pairs = [(t[0][0] + t[0][1]) / 2, t[0][2], (t[1][0] + t[1][1]) / 2, t[1][2]]
    expected = sum(pairs) / 4
    got = bce_loss(*tensors([True, True]), normalization="per_trajectory").item()
    assert got == pytest.approx(expected, rel=1e-6)
    # The two normalisations differ on this example (rows of unequal length), so the option is not a no-op.
    assert got != pytest.approx(sum(t[0] + t[1]) / 6, rel=1e-3)


def test_only_selected_rows_count():
    t = hand_terms()
    pooled = bce_loss(*tensors([True, False])).item()
    assert pooled == pytest.approx((t[0][0] + t[0][1] + t[1][0] + t[1][1]) / 4, rel=1e-6)
    per_traj = bce_loss(*tensors([False, True]), normalization="per_trajectory").item()
    assert per_traj == pytest.approx((t[0][2] + t[1][2]) / 2, rel=1e-6)


def test_bootstrap_mask_leaves_the_denominator():
    t = hand_terms()
    keep = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # drop (head 0, row 1)
    pooled = bce_loss(*tensors([True, True]), keep=keep).item()
    assert pooled == pytest.approx((t[0][0] + t[0][1] + sum(t[1])) / 5, rel=1e-6)
    per_traj = bce_loss(*tensors([True, True]), normalization="per_trajectory", keep=keep).item()
    assert per_traj == pytest.approx(((t[0][0] + t[0][1]) / 2 + (t[1][0] + t[1][1]) / 2 + t[1][2]) / 3, rel=1e-6)


def test_unknown_normalization():
    with pytest.raises(ValueError, match="unknown normalization"):
        bce_loss(*tensors([True, True]), normalization="mean")


# -- empty selection --------------------------------------------------------------------------------------------


def heads_and_logits(n_heads: int = 2, d: int = 4, n_steps: int = 3):
    heads = StackedHeads(n_heads, d, 8)
    heads.reset_parameters(seed=0)
    feats = torch.randn(n_steps, d, generator=torch.Generator().manual_seed(1))
    return heads, heads(feats)


@pytest.mark.parametrize("normalization", ["pooled", "per_trajectory"])
def test_empty_selection_is_finite_and_connected(normalization):
    heads, logits = heads_and_logits()
    loss = bce_loss(logits, torch.tensor(LABELS), torch.tensor(STEP_ROW), torch.tensor([False, False]),
                    normalization=normalization)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()  # would raise if the graph were cut (a constant tensor has no grad_fn)
    for name, p in heads.named_parameters():
        assert p.grad is not None, name
        assert torch.count_nonzero(p.grad) == 0, name


def test_fully_masked_selection_is_finite_and_connected():
    heads, logits = heads_and_logits()
    keep = torch.zeros(2, 2)
    loss = bce_loss(logits, torch.tensor(LABELS), torch.tensor(STEP_ROW), torch.tensor([True, True]), keep=keep)
    loss.backward()
    assert loss.item() == 0.0 and heads.w1.grad is not None


def test_empty_selection_through_actprm_loss_is_counted():
    heads, logits = heads_and_logits()
    params = dict(heads.named_parameters())
    anchors = {k: v.detach().clone() for k, v in params.items()}
    loss, stats = actprm_loss(logits, torch.tensor(LABELS), torch.tensor(STEP_ROW), torch.tensor([False, False]),
                              params, anchors)
    loss.backward()
    assert stats["empty_selection"] is True
    assert stats["bce"] == 0.0 and stats["reg"] == 0.0
    assert all(p.grad is not None for p in params.values())
    _, stats = actprm_loss(logits.detach(), torch.tensor(LABELS), torch.tensor(STEP_ROW), torch.tensor([True, False]),
                           params, anchors)
    assert stats["empty_selection"] is False


# -- anchor regulariser -----------------------------------------------------------------------------------------


def reg_example():
    # 2 heads. Squared differences: w -> [[1, 4], [0, 0]] (sum 5), b -> [[0], [4]] (sum 4); 9 over 6 elements.
    params = {"w": torch.tensor([[1.0, 2.0], [0.0, 0.0]]), "b": torch.tensor([[1.0], [3.0]])}
    anchors = {"w": torch.zeros(2, 2), "b": torch.tensor([[1.0], [1.0]])}
    return params, anchors


def test_element_mean_regularizer_by_hand():
    params, anchors = reg_example()
    assert anchor_regularizer(params, anchors, lam=0.5).item() == pytest.approx(0.5 * 9 / 6)  # 0.75


def test_per_head_sum_regularizer_by_hand():
    params, anchors = reg_example()
    got = anchor_regularizer(params, anchors, lam=0.5, kind="per_head_sum").item()
    assert got == pytest.approx(0.5 / 2 * 9)  # 2.25


def test_per_head_sum_to_element_mean_ratio_is_elements_per_head():
    # For real heads the ratio is the element count of one head: d·h + h + h·h + h + h + 1.
    d, h = 16, 8
    heads = StackedHeads(3, d, h)
    heads.reset_parameters(seed=0)
    anchors = {k: v.detach().clone() for k, v in heads.named_parameters()}
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.1)
    params = dict(heads.named_parameters())
    ratio = (anchor_regularizer(params, anchors, lam=1.0, kind="per_head_sum")
             / anchor_regularizer(params, anchors, lam=1.0)).item()
    assert ratio == pytest.approx(d * h + h + h * h + h + h + 1, rel=1e-5)


def test_regularizer_zero_for_one_head_or_zero_lambda():
    params = {"w": torch.tensor([[3.0, 4.0]], requires_grad=True)}
    anchors = {"w": torch.zeros(1, 2)}
    r = anchor_regularizer(params, anchors, lam=0.5)
    assert r.item() == 0.0
    r.backward()
    assert params["w"].grad is not None  # still connected
    params2, anchors2 = reg_example()
    assert anchor_regularizer(params2, anchors2, lam=0.0, kind="per_head_sum").item() == 0.0


def test_unknown_regularizer():
    params, anchors = reg_example()
    with pytest.raises(ValueError, match="unknown regularizer"):
        anchor_regularizer(params, anchors, lam=0.5, kind="l1")


def test_total_loss_is_bce_plus_reg():
    t = hand_terms()
    params, anchors = reg_example()
    logits, labels, step_row, selected = tensors([True, True])
    loss, stats = actprm_loss(logits, labels, step_row, selected, params, anchors, lam=0.5)
    expected_bce = sum(t[0] + t[1]) / 6
    assert stats["bce"] == pytest.approx(expected_bce, rel=1e-6)
    assert stats["reg"] == pytest.approx(0.75)
    assert loss.item() == pytest.approx(expected_bce + 0.75, rel=1e-6)
