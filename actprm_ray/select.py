"""Uncertainty and the selection rule (METHOD §4): pure functions of per-step µ and σ, no Ray, no config.

Worked example (δ_pred = 0.95, δ_std = 0.005):
    µ = [0.99, 0.97, 0.20, 0.60], σ = [0.001]*4
    predicted first error E = 2 (first µ < 0.5), considered steps C = {0, 1, 2}
    max(µ, 1-µ) over C = [0.99, 0.97, 0.80]: 0.80 < 0.95 -> aleatoric -> selected.
    (step 3 is outside C, so its 0.60 does not matter)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

MODES = ("active", "all", "random", "none")


def considered_length(step_mean: Sequence[float], step_threshold: float = 0.5) -> int:
    """|C(s)|: steps up to and including the predicted first error, or all steps if none is predicted."""
    for i, m in enumerate(step_mean):
        if m < step_threshold:
            return i + 1
    return len(step_mean)


def predicted_first_error(step_mean: Sequence[float], step_threshold: float = 0.5) -> int:
    """ProcessBench prediction: first i with µ_i < τ, else -1."""
    for i, m in enumerate(step_mean):
        if m < step_threshold:
            return i
    return -1


def uncertainty_kinds(step_mean, step_std, *, delta_pred: float = 0.95, delta_std: float = 0.005,
                      step_threshold: float = 0.5) -> tuple[bool, bool]:
    """(aleatoric, epistemic) over C(s). Equality with a threshold counts as trusted."""
    if len(step_mean) != len(step_std):
        raise ValueError(f"{len(step_mean)} means but {len(step_std)} stds")
    c = considered_length(step_mean, step_threshold)
    # Written as "not trusted" so that a NaN µ or σ counts as uncertain (selected), never as silently trusted.
    aleatoric = any(not max(m, 1.0 - m) >= delta_pred for m in step_mean[:c])
    epistemic = any(not s <= delta_std for s in step_std[:c])
    return aleatoric, epistemic


def is_uncertain(step_mean, step_std, *, delta_pred: float = 0.95, delta_std: float = 0.005,
                 step_threshold: float = 0.5) -> bool:
    """Selected (sent to the judge) iff aleatoric OR epistemic uncertainty on C(s)."""
    a, e = uncertainty_kinds(step_mean, step_std, delta_pred=delta_pred, delta_std=delta_std,
                             step_threshold=step_threshold)
    return a or e


def is_uncertain_batch(step_means, step_stds, **thresholds) -> np.ndarray:
    """Vectorised over rows of different lengths (a list of per-row arrays)."""
    return np.array([is_uncertain(m, s, **thresholds) for m, s in zip(step_means, step_stds)], dtype=bool)


def ablation_thresholds(kind: str, delta_pred: float = 0.95, delta_std: float = 0.005) -> dict:
    """both | aleatoric_only (δ_std = ∞) | epistemic_only (δ_pred = 0.5)."""
    if kind == "both":
        return {"delta_pred": delta_pred, "delta_std": delta_std}
    if kind == "aleatoric_only":
        return {"delta_pred": delta_pred, "delta_std": math.inf}
    if kind == "epistemic_only":
        return {"delta_pred": 0.5, "delta_std": delta_std}
    raise ValueError(f"unknown ablation {kind!r}: both | aleatoric_only | epistemic_only")


def random_draw(row_id: str, seed: int) -> float:
    """A uniform [0, 1) number fixed by (row id, seed): random selection independent of batching and replicas."""
    h = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def select_rows(mode: str, uncertain: Sequence[bool], row_ids: Sequence[str], *, random_rate: float = 0.5,
                seed: int = 0) -> np.ndarray:
    """The label decision per row for each mode: active = uncertain; all; random at `random_rate`; none."""
    n = len(row_ids)
    if mode == "active":
        return np.asarray(uncertain, dtype=bool)
    if mode == "all":
        return np.ones(n, dtype=bool)
    if mode == "none":
        return np.zeros(n, dtype=bool)
    if mode == "random":
        return np.array([random_draw(str(r), seed) < random_rate for r in row_ids], dtype=bool)
    raise ValueError(f"unknown selection mode {mode!r}: one of {MODES}")


def pseudo_labels(step_mean: Sequence[float], step_threshold: float = 0.5) -> list[int]:
    """Pseudo-label of a trusted row: 1 while µ >= τ, cut after the first 0 (compared by exact match)."""
    k = predicted_first_error(step_mean, step_threshold)
    return [1] * len(step_mean) if k == -1 else [1] * k + [0]
