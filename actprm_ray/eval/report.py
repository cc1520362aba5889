"""Evaluation outputs: predictions.jsonl, metrics.json, report.md (laid out like the paper's table) and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

from actprm_ray.eval.metrics import CATEGORY_ABBREV, CORRECT_CATEGORY
from actprm_ray.eval.runner import BenchmarkResult

PB_COLUMNS = [("gsm8k", "GSM8K"), ("math", "MATH"), ("olympiadbench", "Olymp."), ("omnimath", "Omni")]
# METHOD §10 (paper): GSM8K, MATH, Olymp., Omni, PB avg, Simpl., Sound., Sens., PRMBench. None = not reported.
PAPER_ROWS = [
    ("ActPRM", [0.816, 0.798, 0.714, 0.670, 0.750, 0.536, 0.713, 0.752, 0.655]),
    ("ActPRM-X", [0.827, 0.820, 0.720, 0.673, 0.760, 0.545, 0.727, 0.756, 0.667]),
    ("Qwen2.5-Math-PRM-7B", [0.824, 0.776, 0.675, 0.663, 0.735, 0.521, 0.710, 0.755, 0.655]),
    ("QwQ-32B (judge)", [0.871, 0.834, 0.787, 0.771, 0.816, None, None, None, None]),
]
HEADER = ["model", "GSM8K", "MATH", "Olymp.", "Omni", "**PB avg**", "Simpl.", "Sound.", "Sens.", "**PRMBench**"]


def _fmt(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}".lstrip("0") if 0 <= x < 1 else f"{x:.3f}"  # the paper's ".816" style


def our_row(results: dict[str, BenchmarkResult]) -> list[float | None]:
    """This run's values in the paper's column order (None where that benchmark was not run)."""
    row: list[float | None] = [None] * 9
    pb = results.get("processbench")
    if pb is not None:
        subsets = pb.metrics["subsets"]
        row[:4] = [subsets[k]["f1"] if k in subsets else None for k, _ in PB_COLUMNS]
        row[4] = pb.metrics["mean_f1"]
    prm = results.get("prmbench")
    if prm is not None:
        g = prm.metrics["groups"]
        row[5:] = [g["simplicity"], g["soundness"], g["sensitivity"], prm.metrics["overall"]["prm_score"]]
    return row


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def markdown_report(results: dict[str, BenchmarkResult], meta: dict) -> str:
    """The paper-style headline table with our row, then per-benchmark detail tables."""
    label = f"**this run** ({meta.get('checkpoint_name', 'checkpoint')})"
    rows = [[name] + [_fmt(v) for v in vals] for name, vals in PAPER_ROWS]
    rows.append([label] + [_fmt(v) for v in our_row(results)])
    out = [f"# Evaluation: {meta.get('checkpoint_name', '')}", ""]
    out.append(f"Checkpoint `{meta.get('checkpoint')}` ({meta.get('kind')}); ProcessBench τ = {meta.get('tau')}; "
               "PRMBench step valid iff µ > 0.5. Paper rows from METHOD §10.")
    if meta.get("limit"):
        out.append(f"**Partial run: --limit {meta['limit']} per subset/category; not comparable with the paper.**")
    if "processbench" in results or "prmbench" in results:  # the paper's table covers these two only
        out += [""] + _table(HEADER, rows) + [""]
    else:
        out += [""]
    for name, res in results.items():
        m = res.metrics
        if name == "prmbench":
            out += [f"## PRMBench (overall PRMScore {_fmt(m['overall']['prm_score'])})", ""]
            cat_rows = []
            for cat, c in m["categories"].items():
                abbrev = CATEGORY_ABBREV.get(cat, "–" if cat != CORRECT_CATEGORY else "correct")
                cat_rows.append([abbrev, cat, _fmt(c["f1_pos"]), _fmt(c["f1_neg"]), _fmt(c["score"]),
                                 str(c["tp"] + c["fn"]), str(c["tn"] + c["fp"])])
            out += _table(["abbr.", "category", "F1_pos", "F1_neg", "score", "correct steps", "error steps"], cat_rows)
            st = m["data"]["stats"]
            out += ["", "Groups: " + ", ".join(f"{g} {_fmt(v)}" for g, v in m["groups"].items())
                    + ". MS and correct score F1_pos only; the overall pools the 9 error categories.",
                    f"Data: {st.get('unique_rows')} unique rows ({st.get('duplicates_dropped')} duplicates dropped) + "
                    f"{st.get('extra_correct')} extra correct samples; {st.get('out_of_range_error_steps')} out-of-range "
                    f"error steps ignored in {st.get('rows_with_out_of_range')} rows; {st.get('step_prefixes_stripped')} "
                    "step prefixes stripped. Samples the canonical format rejects (empty steps) are left out and "
                    "counted as unscorable below.", ""]
        else:
            out += [f"## {name} (mean F1 {_fmt(m['mean_f1'])} at τ = {m['tau']})", ""]
            sub_rows = [[s, _fmt(v["acc_err"]), _fmt(v["acc_cor"]), _fmt(v["f1"]), str(v["n_err"]), str(v["n_cor"])]
                        for s, v in m["subsets"].items()]
            out += _table(["subset", "acc_err", "acc_cor", "F1", "n_err", "n_cor"], sub_rows) + [""]
            if "sweep" in m:
                sw = m["sweep"]
                out += [f"Threshold sweep (monitoring only, never the headline): τ = {sw['tau']} fitted on "
                        f"{sw['fitted_on']} (F1 {_fmt(sw['f1_on_fit_subset'])}); other subsets at that τ: "
                        + ", ".join(f"{s} {_fmt(v)}" for s, v in sw["f1_other_subsets"].items()), ""]
            out += [f"- warning: {w}" for w in m.get("warnings", [])]
        sc, data = m["scoring"], m["data"]
        out += [
            f"Scoring: {sc['rows_scored']} rows / {sc['steps_scored']} steps in {sc['wall_s']:.1f} s "
            f"({(sc['rows_per_s'] or 0):.1f} rows/s); padding {sc['padding_fraction_before_bucketing']:.1%} before "
            f"vs {sc['padding_fraction_after_bucketing']:.1%} after length bucketing ({sc['padding_length_unit']}); "
            f"{sc['unscorable']} unscorable. Data: {data['stats'].get('samples')} samples, "
            f"{data['skipped_rows']} rows skipped.",
            "",
        ]
    return "\n".join(out)


def _plots(results: dict[str, BenchmarkResult], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers / CI
    import matplotlib.pyplot as plt

    paths = []
    for name, res in results.items():
        m, stem = res.metrics, name.replace(":", "_")
        fig, ax = plt.subplots(figsize=(7, 4))
        if name == "prmbench":
            cats = list(m["categories"])
            ax.bar([CATEGORY_ABBREV.get(c, c) for c in cats], [m["categories"][c]["score"] for c in cats])
            ax.axhline(m["overall"]["prm_score"], color="k", ls="--", label="overall PRMScore")
            ax.set_ylabel("score (PRMScore; F1_pos for MS/correct)")
        else:
            subs = list(m["subsets"])
            ax.bar(subs, [m["subsets"][s]["f1"] for s in subs])
            ax.axhline(m["mean_f1"], color="k", ls="--", label=f"mean F1 {m['mean_f1']:.3f}")
            ax.set_ylabel(f"F1 at τ = {m['tau']}")
            ax.tick_params(axis="x", rotation=20)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: per-subset score")
        ax.legend()
        fig.tight_layout()
        p = out_dir / f"{stem}_per_subset.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)

        fig, ax = plt.subplots(figsize=(7, 4))
        if name == "prmbench":
            taus = [pt["tau"] for pt in m["curve"]]
            ax.plot(taus, [pt["prm_score"] for pt in m["curve"]], label="overall PRMScore")
            ax.plot(taus, [pt["step_acc"] for pt in m["curve"]], label="step accuracy")
            ax.set_xlabel("validity threshold t (valid iff µ > t)")
        else:
            curves = list(m["curve"].values())
            for sub, pts in m["curve"].items():
                ax.plot([p["tau"] for p in pts], [p["f1"] for p in pts], label=f"{sub} F1")
            # The two accuracies behind F1, averaged over subsets: shows which side a threshold trades away.
            taus = [p["tau"] for p in curves[0]] if curves else []
            for key, style in (("acc_err", "--"), ("acc_cor", ":")):
                mean = [sum(c[i][key] for c in curves) / len(curves) for i in range(len(taus))]
                ax.plot(taus, mean, "k" + style, label=f"mean {key}")
            ax.set_xlabel("τ (first step with µ < τ is the predicted error)")
        ax.axvline(m["tau"], color="gray", ls=":")
        ax.set_ylim(0, 1)
        ax.set_ylabel("score")
        # Two lines: on one, the title ran past the right edge of the 7-inch figure (tight_layout does not wrap).
        ax.set_title(f"{name}: accuracy vs threshold\n(monitoring; the headline uses {m['tau']})", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / f"{stem}_threshold_curve.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def _finite(obj):
    """JSON has no NaN/inf: write them as null so the file stays valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def write_outputs(results: dict[str, BenchmarkResult], out_dir: str | Path, meta: dict) -> dict[str, object]:
    """Write predictions.jsonl, metrics.json, report.md and the plots; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / "predictions.jsonl"
    with open(pred_path, "w", encoding="utf-8") as fh:
        for res in results.values():
            for row in res.predictions:
                fh.write(json.dumps(row) + "\n")
    metrics = {"meta": meta, "benchmarks": {name: res.metrics for name, res in results.items()}}
    if "processbench" in results:
        metrics["processbench_f1"] = results["processbench"].metrics["mean_f1"]
    if "prmbench" in results:
        metrics["prmbench_score"] = results["prmbench"].metrics["overall"]["prm_score"]
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps(_finite(metrics), indent=2))
    report_path = out / "report.md"
    report_path.write_text(markdown_report(results, meta))
    return {"predictions": pred_path, "metrics": metrics_path, "report": report_path, "plots": _plots(results, out)}
