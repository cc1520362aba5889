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


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    """Mean and a 95% Student-t interval over seeds (n - 1 degrees of freedom); NaN bounds for one value."""
    import math
    from statistics import mean, stdev

    n, m = len(xs), mean(xs)
    if n < 2:
        return m, math.nan, math.nan
    t = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}.get(n - 1, 2.0)
    h = t * stdev(xs) / math.sqrt(n)
    return m, m - h, m + h


def plot_label_efficiency(curves: dict[str, list[list[dict]]], path, *, pool_rows: int, title: str,
                          key: str = "f1", ylabel: str = "held-out F1 (ProcessBench protocol, τ = 0.5)",
                          references: dict[str, float] | None = None,
                          rate_traces: dict[str, list[list[dict]]] | None = None,
                          targets: dict[str, float] | None = None) -> None:
    """Fig. 2a's shape: F1 against labels used (% of the pool), one line per arm = the mean over seeds, the band
    its 95% t-interval; a run contributes only up to the labels it used. `references` are horizontal lines (the
    full-data final F1, a zero-label detector). `rate_traces` ({"seen", "rate"} per run) add a right panel: the
    cumulative label rate as the pool streams by, with each controller's target dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = 2 if rate_traces else 1
    fig, axes = plt.subplots(1, panels, figsize=(7.5 * panels, 4.8), squeeze=False)
    ax = axes[0][0]
    for arm, runs in curves.items():
        grid = sorted({p["labels"] for points in runs for p in points})
        stats = []
        for x in grid:
            vals = [f1_at_budget(points, x, key) for points in runs if max(p["labels"] for p in points) >= x]
            if vals:
                stats.append((x, *t_interval(vals)))
        xs, mean, low, high = (np.array(c, dtype=float) for c in zip(*stats))
        line, = ax.plot(100 * xs / pool_rows, mean, label=f"{arm} (n={len(runs)})", drawstyle="steps-post")
        ok = ~np.isnan(low)
        ax.fill_between(100 * xs[ok] / pool_rows, low[ok], high[ok], step="post", alpha=0.15, color=line.get_color())
    for (name, y), style in zip((references or {}).items(), ("--", ":", "-.")):
        ax.axhline(y, ls=style, color="gray", lw=1.0, label=f"{name} ({y:.3f})")
    ax.set_xlabel(f"labels used (% of the {pool_rows:,}-row pool)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    if rate_traces:
        ax = axes[0][1]
        for arm, runs in rate_traces.items():
            line = None
            for trace in runs:
                line, = ax.plot([p["seen"] for p in trace], [p["rate"] for p in trace], lw=0.8, alpha=0.7,
                                color=None if line is None else line.get_color(), label=None if line else arm)
            if targets and arm in targets:
                ax.axhline(targets[arm], ls="--", lw=0.8, color=line.get_color())
        ax.set_xlabel("pool rows seen")
        ax.set_ylabel("cumulative label rate (one line per seed)")
        ax.set_ylim(0, 1.05)
        ax.set_title("label rate as the pool streams by (dashed: controller targets)", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def surprise_reference(backbone_dir, rows: list[dict], *, sep: str, system_prompt: str) -> dict:
    """The zero-label reference line: F1 of the pretrained LM's surprise detector (model/pretrain.py, no labels)
    on the same test rows as the curves."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actprm_ray.eval.metrics import first_error_metrics
    from actprm_ray.model.pretrain import surprise_first_errors

    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    if sep not in tokenizer.get_vocab():
        return {"detector": None, "f1": None, "reason": "the backbone was not pretrained with the step separator"}
    lm = AutoModelForCausalLM.from_pretrained(backbone_dir, use_safetensors=True)
    preds = surprise_first_errors(lm, tokenizer, rows, sep=sep, system_prompt=system_prompt)
    m = first_error_metrics([int(r["first_error_step"]) for r in rows], preds)
    return {"detector": "first result digit with LM probability < 0.5", "f1": m["f1"], "acc_err": m["acc_err"],
            "acc_cor": m["acc_cor"]}
