"""Label-efficiency curves: points {"labels": n, <metric>: value, ...}, read as step functions of the labels used."""

from __future__ import annotations


def f1_at_budget(points: list[dict], labels: float, key: str = "f1") -> float | None:
    """`key` of the last point whose labels used is <= `labels`; None before the first point."""
    best = None
    for p in sorted(points, key=lambda p: p["labels"]):
        if p["labels"] <= labels + 1e-9:
            best = p[key]
    return best


def labels_to_reach(points: list[dict], target: float, key: str = "f1") -> int | None:
    """The fewest labels at which `key` reaches `target`; None if it never does."""
    for p in sorted(points, key=lambda p: p["labels"]):
        if p[key] >= target - 1e-9:
            return int(p["labels"])
    return None
