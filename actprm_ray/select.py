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


# --- audited trust and the label-rate controller (beyond the paper; docs/RESULTS.md says why) ---------------------

AUDIT_SALT = "audit"  # audit draws use their own hash stream, independent of mode=random's


def uncertainty_score(step_mean, step_std, *, delta_pred: float = 0.95, delta_std: float = 0.005,
                      step_threshold: float = 0.5) -> float:
    """u(s) >= 0 over C(s), scaled so that the rule's thresholds sit at 1: the largest of (1 - max(µ, 1-µ)) / (1 - δ_pred)
    and σ / δ_std. Trusted at thresholds scaled by λ (δ_pred' = 1 - λ(1 - δ_pred), δ_std' = λ·δ_std) iff u <= λ, so
    one number moves both thresholds together. NaN scores count as infinitely uncertain."""
    if len(step_mean) != len(step_std):
        raise ValueError(f"{len(step_mean)} means but {len(step_std)} stds")
    c = considered_length(step_mean, step_threshold)

    def ratio(x: float, limit: float) -> float:
        if math.isnan(x):
            return math.inf
        return x / limit if limit > 0 else (0.0 if x <= 0 else math.inf)

    return max([0.0] + [max(ratio(1.0 - max(m, 1.0 - m), 1.0 - delta_pred), ratio(s, delta_std))
                        for m, s in zip(step_mean[:c], step_std[:c])])


def audit_candidates(row_ids: Sequence[str], audit_rate: float, seed: int = 0) -> np.ndarray:
    """Rows that are labelled anyway if trusted: a fixed share, by a per-row hash (independent of batching)."""
    return np.array([random_draw(f"{AUDIT_SALT}:{r}", seed) < audit_rate for r in row_ids], dtype=bool)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sensible at 0 or n successes, unlike the normal one)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class RateController:
    """Holds a target label rate by moving both thresholds together (trusted iff u(s) <= scale; see uncertainty_score).

    After each batch, `scale` becomes the quantile of the last `window` scores that labels the rate still owed:
    target + (target·seen − labelled) / window, so the cumulative rate converges on the target whatever the model
    does (a budget spent evenly over a pool is target = max_labels / pool rows). Audits feed the guard: once the
    last `audit_window` audited pseudo-labels (at least `min_audits`) are right less often than `accuracy_floor`,
    the controller trusts nothing -- every row is labelled, the would-be-trusted ones as audits -- until the
    audited accuracy is back above the floor. That is the guard against freezing confidently wrong. Pure state,
    no Ray: the streaming loop keeps one in the run coordinator; a restart starts it again at scale 1.
    """

    def __init__(self, target_rate: float, *, window: int = 512, accuracy_floor: float = 0.8, min_audits: int = 20,
                 audit_window: int = 100):
        if not 0.0 < target_rate <= 1.0:
            raise ValueError(f"target_rate={target_rate}: must lie in (0, 1]")
        self.target, self.window, self.floor = target_rate, window, accuracy_floor
        self.min_audits, self.audit_window = min_audits, audit_window
        self.scale, self.seen, self.labelled, self.guarded_rows = 1.0, 0, 0, 0
        self._recent: list[float] = []
        self._audits: list[bool] = []

    @property
    def guarded(self) -> bool:
        recent = self._audits[-self.audit_window:]
        return len(recent) >= self.min_audits and sum(recent) / len(recent) < self.floor

    def decide(self, scores: Sequence[float], candidates: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
        """(selected, audit) for one batch of valid rows; `candidates` are the audit draws (audit_candidates)."""
        u = np.asarray(scores, dtype=float)
        trusted = u <= self.scale
        if self.guarded:
            audit, selected = trusted.copy(), np.ones(len(u), dtype=bool)
            self.guarded_rows += len(u)
        else:
            audit = trusted & np.asarray(candidates, dtype=bool)
            selected = ~trusted | audit
        self._observe(u, selected)
        return selected, audit

    def record_audits(self, correct: Sequence[bool]) -> None:
        self._audits = (self._audits + [bool(c) for c in correct])[-self.audit_window:]

    def _observe(self, u: np.ndarray, selected: np.ndarray) -> None:
        self.seen += len(u)
        self.labelled += int(selected.sum())
        self._recent = (self._recent + [float(x) for x in u])[-self.window:]
        owed = self.target * self.seen - self.labelled
        rate = min(1.0, max(0.0, self.target + owed / self.window))
        # Label the top `rate` share of recent scores: scale = their (1 - rate) quantile (u > scale is selected).
        finite = np.minimum(np.asarray(self._recent), np.finfo(float).max)
        self.scale = -1.0 if rate >= 1.0 else float(np.quantile(finite, 1.0 - rate, method="lower"))

    def state(self) -> dict:
        recent = self._audits[-self.audit_window:]
        return {"target_rate": self.target, "scale": self.scale, "seen": self.seen, "labelled": self.labelled,
                "label_rate": self.labelled / self.seen if self.seen else math.nan, "guarded": self.guarded,
                "guarded_rows": self.guarded_rows, "recent_audits": len(recent),
                "recent_audit_accuracy": sum(recent) / len(recent) if recent else math.nan}
