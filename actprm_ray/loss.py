"""ActPRM loss (METHOD §5): BCE over every head x selected row x labelled step, plus the anchor regulariser.

Shapes: logits (n, N) for N read-out steps of the micro-batch; labels (N,); step_row (N,) = row of each step;
row_selected (R,) bool. All in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bce_loss(logits: torch.Tensor, labels: torch.Tensor, step_row: torch.Tensor, row_selected: torch.Tensor,
             *, normalization: str = "pooled", keep: torch.Tensor | None = None) -> torch.Tensor:
    """pooled: Σℓ / #(k,s,i); per_trajectory: mean over a row's steps, then over rows and heads.

    keep (n, R) is the optional bootstrap mask; masked (head, row) pairs leave the denominator.
    An empty selection returns 0·Σz: finite, and the graph stays connected so every DDP rank calls backward.
    """
    logits = logits.float()
    n_heads, n_rows = logits.shape[0], row_selected.shape[0]
    weight = row_selected[step_row].float().unsqueeze(0).expand(n_heads, -1)  # (n, N)
    if keep is not None:
        weight = weight * keep.float()[:, step_row]
    if weight.sum() == 0:
        return 0.0 * logits.sum()
    ell = F.binary_cross_entropy_with_logits(logits, labels.float().unsqueeze(0).expand_as(logits), reduction="none")
    if normalization == "pooled":
        return (ell * weight).sum() / weight.sum()
    if normalization == "per_trajectory":
        # Per (head, row): mean over its steps; then mean over the (head, row) pairs that carry weight.
        sums = torch.zeros(n_heads, n_rows, device=logits.device).index_add_(1, step_row, ell * weight)
        counts = torch.zeros(n_heads, n_rows, device=logits.device).index_add_(1, step_row, weight)
        present = counts > 0
        return (sums[present] / counts[present]).mean()
    raise ValueError(f"unknown normalization {normalization!r}: pooled | per_trajectory")


def anchor_regularizer(params: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor], *, lam: float,
                       kind: str = "element_mean") -> torch.Tensor:
    """element_mean: λ·mean over all head-parameter elements of (θ-θ0)²;
    per_head_sum: (λ/n)·Σ_k ‖φ_k-φ_k0‖² (about 475K x stronger at the same λ for d=3584). Tensors are [n, ...]."""
    diffs = [(params[k].float() - anchors[k].float()) ** 2 for k in params]
    n_heads = next(iter(params.values())).shape[0]
    if lam == 0 or n_heads == 1:
        return 0.0 * sum(d.sum() for d in diffs)
    if kind == "element_mean":
        return lam * sum(d.sum() for d in diffs) / sum(d.numel() for d in diffs)
    if kind == "per_head_sum":
        return (lam / n_heads) * sum(d.sum() for d in diffs)
    raise ValueError(f"unknown regularizer {kind!r}: element_mean | per_head_sum")


def actprm_loss(logits, labels, step_row, row_selected, params, anchors, *, lam=0.5, normalization="pooled",
                regularizer="element_mean", keep=None) -> tuple[torch.Tensor, dict]:
    """L = L_bce + R; returns (loss, stats) with stats["empty_selection"] set for counting such steps."""
    l_bce = bce_loss(logits, labels, step_row, row_selected, normalization=normalization, keep=keep)
    reg = anchor_regularizer(params, anchors, lam=lam, kind=regularizer)
    empty = not bool(row_selected.any())
    return l_bce + reg, {"bce": float(l_bce.detach()), "reg": float(reg.detach()), "empty_selection": empty}
