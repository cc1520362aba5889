"""Evaluation protocols: load a benchmark, score it with any scorer, turn per-step µ into predictions + metrics.

    load (LoadResult) -> batching.score_rows(scorer) -> evaluate_first_error | evaluate_prmbench -> BenchmarkResult

The first-error protocol (METHOD §9, ProcessBench) serves ProcessBench and every step_labeled_extra adapter;
PRMBench has its own step-validity protocol. Rows the canonical format rejects get a prediction row with
`pred: null` and a reason, and are left out of the metrics (counted in `scoring.unscorable`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from actprm_ray.config import EVAL_BENCHMARKS as BENCHMARKS
from actprm_ray.config import MAX_EVAL_TOKENS
from actprm_ray.eval import metrics as M
from actprm_ray.eval.batching import Scorer, ScoreResult, score_rows
from actprm_ray.eval.samples import EvalDataError, LoadResult

# Sweep grid for monitoring curves: 0.025 .. 0.975 (0.5 included). Never used for the headline.
THRESHOLDS = [round(0.025 * i, 3) for i in range(1, 40)]
MAX_SKIPPED_LISTED = 50  # metrics.json lists at most this many skipped rows; the count is always exact


@dataclass
class BenchmarkResult:
    benchmark: str  # "processbench" | "prmbench" | "first_error:<format>"
    predictions: list[dict]
    metrics: dict = field(default_factory=dict)


def _data_section(load: LoadResult, path: str | None) -> dict:
    return {"path": path, "stats": load.stats, "skipped_rows": len(load.skipped), "skipped": load.skipped[:MAX_SKIPPED_LISTED]}


def evaluate_first_error(name: str, load: LoadResult, scored: ScoreResult, *, tau: float = 0.5,
                         sweep_on: str | None = None, thresholds: list[float] = THRESHOLDS) -> BenchmarkResult:
    """ProcessBench protocol on scored samples: per-subset acc_err/acc_cor/F1 at τ, the mean F1, the τ curve,
    and (with `sweep_on`) the best τ fitted on that subset, applied to the others and reported apart."""
    predictions, per_subset, per_subset_mu = [], {}, {}
    reasons = {u["id"]: u["reason"] for u in scored.unscorable}
    for s, mu in zip(load.samples, scored.mus):
        row = {"benchmark": name, "id": s.id, "subset": s.subset, "label": s.label}
        if mu is None:
            predictions.append({**row, "pred": None, "step_mu": None, "unscorable": reasons.get(s.id, "")})
            continue
        pred = M.first_error_prediction(mu, tau)
        predictions.append({**row, "pred": pred, "step_mu": mu})
        labels, preds = per_subset.setdefault(s.subset, ([], []))
        labels.append(s.label)
        preds.append(pred)
        per_subset_mu.setdefault(s.subset, ([], []))
        per_subset_mu[s.subset][0].append(s.label)
        per_subset_mu[s.subset][1].append(mu)
    summary = M.processbench_summary(per_subset)
    curve = M.threshold_curve(per_subset_mu, thresholds)
    warnings = [f"{sub}: no rows for {', '.join(m['undefined'])} (set to 0, F1 not meaningful)"
                for sub, m in summary["subsets"].items() if m["undefined"]]
    metrics = {"tau": tau, **summary, "curve": curve, "warnings": warnings}
    if sweep_on is not None:
        metrics["sweep"] = _sweep(curve, sweep_on)
    return BenchmarkResult(name, predictions, metrics)


def _sweep(curve: dict[str, list[dict]], fit_subset: str) -> dict:
    """Fit τ on one subset (highest F1), then report the other subsets at that τ. Monitoring only."""
    if fit_subset not in curve:
        raise EvalDataError(f"eval.sweep_on={fit_subset!r} is not an evaluated subset; choose one of {sorted(curve)}")
    best = M.best_threshold(curve[fit_subset])
    at_best = {s: next(p for p in pts if p["tau"] == best["tau"])["f1"] for s, pts in curve.items() if s != fit_subset}
    return {
        "fitted_on": fit_subset,
        "tau": best["tau"],
        "f1_on_fit_subset": best["f1"],
        "f1_other_subsets": at_best,
        "mean_f1_other_subsets": sum(at_best.values()) / len(at_best) if at_best else None,
    }


def evaluate_prmbench(load: LoadResult, scored: ScoreResult, *, threshold: float = 0.5,
                      thresholds: list[float] = THRESHOLDS) -> BenchmarkResult:
    """PRMBench protocol: a step is valid iff µ > threshold; pooled overall, per category, and the groups."""
    predictions, triples, curve_in = [], [], []
    reasons = {u["id"]: u["reason"] for u in scored.unscorable}
    for s, mu in zip(load.samples, scored.mus):
        row = {"benchmark": "prmbench", "id": s.id, "subset": s.subset, "error_steps": s.error_steps}
        if mu is None:
            predictions.append({**row, "valid": None, "step_mu": None, "unscorable": reasons.get(s.id, "")})
            continue
        valid = M.step_validity(mu, threshold)
        predictions.append({**row, "valid": valid, "step_mu": mu})
        triples.append((s.subset, s.error_steps, valid))
        curve_in.append((s.subset, s.error_steps, mu))
    metrics = {"tau": threshold, **M.prmbench_summary(triples), "curve": M.prmbench_threshold_curve(curve_in, thresholds)}
    return BenchmarkResult("prmbench", predictions, metrics)


def load_benchmark(benchmark: str, *, data: str | Path | None = None, fmt: str | None = None,
                   limit: int | None = None) -> tuple[str, LoadResult]:
    """(result name, LoadResult) for a benchmark; `data` overrides the default path under shared/data."""
    if benchmark == "processbench":
        from actprm_ray.eval.processbench import load_processbench

        return "processbench", load_processbench(data, limit=limit)
    if benchmark == "prmbench":
        from actprm_ray.eval.prmbench import load_prmbench

        return "prmbench", load_prmbench(data, limit=limit)
    if benchmark == "first_error":
        from actprm_ray.eval.first_error import FORMATS, load_first_error

        if not fmt:
            raise EvalDataError(f"benchmark first_error needs a format (eval.format), one of {sorted(FORMATS)}")
        return f"first_error:{fmt}", load_first_error(fmt, data, limit=limit)
    raise EvalDataError(f"unknown benchmark {benchmark!r}; choose one of {BENCHMARKS}")


def run_benchmark(benchmark: str, scorer: Scorer, *, data: str | Path | None = None, fmt: str | None = None,
                  limit: int | None = None, batch_size: int = 16, tau: float = 0.5,
                  sweep_on: str | None = None, max_tokens: int | None = MAX_EVAL_TOKENS) -> BenchmarkResult:
    """Load, score and evaluate one benchmark; metrics carry the data and scoring sections as well."""
    name, load = load_benchmark(benchmark, data=data, fmt=fmt, limit=limit)
    rows = [{"id": s.id, "question": s.question, "steps": s.steps} for s in load.samples]
    scored = score_rows(rows, scorer, batch_size=batch_size, max_tokens=max_tokens)
    if benchmark == "prmbench":
        result = evaluate_prmbench(load, scored)
    else:
        result = evaluate_first_error(name, load, scored, tau=tau, sweep_on=sweep_on)
    result.metrics["data"] = _data_section(load, None if data is None else str(data))
    result.metrics["scoring"] = {"batch_size": batch_size, "max_tokens": max_tokens, **scored.summary()}
    return result
