"""The active run's report: report.md and PNGs in <run dir>/report/, from the files a finished run keeps
(summary.json, outcomes.parquet, metrics.jsonl). Is active learning working? The selection plot says it: the
label rate should fall and trust rise as model versions go by, with pseudo-labels on trusted rows that hold up.

    python -m actprm_ray.drivers.run_report ~/actprm_results/default     # (re)write a finished run's report
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

from actprm_ray.pipeline import outcomes as oc

VERSION_BINS = 12  # points on the selection curve: enough to see a trend, each with enough rows to mean something


def verdict(summary: dict) -> str:
    """One line: what active learning did in this run."""
    acc = summary.get("pseudo_label_accuracy")
    acc_text = "n/a (no oracle)" if acc is None else f"{100 * acc:.1f}%"
    return (f"labelled {summary['labels_used']} of {summary['rows_read']} rows ({100 * summary['label_rate']:.1f}%), "
            f"trusted {summary['trust_pct']:.1f}%, pseudo-label accuracy {acc_text}")


def selection_by_version(rows: list[dict], bins: int = VERSION_BINS) -> list[dict]:
    """Rows with a selection decision, ordered by the model version that scored them, in `bins` equal parts
    (the scorer runs ahead of the trainer, so equal version ranges would hold very unequal rows). Per part: the
    version range, label rate and trust %, and the pseudo-label accuracy of the trusted rows against the pool's
    label (None where none is known)."""
    decided = sorted((r for r in rows if r["outcome"] in (oc.TRAINED, oc.LABEL_FAILED, oc.CONFIDENT)),
                     key=lambda r: r["model_version"])
    out, start = [], 0
    for b in range(min(bins, len(decided))):
        end = (b + 1) * len(decided) // min(bins, len(decided))
        part = decided[start:end]
        trusted = [r for r in part if r["outcome"] == oc.CONFIDENT]
        known = [r["pseudo_label_correct"] for r in trusted if r["pseudo_label_correct"] >= 0]
        out.append({"versions": [part[0]["model_version"], part[-1]["model_version"]], "rows_before": start,
                    "rows": len(part), "label_rate": (len(part) - len(trusted)) / len(part),
                    "trust": len(trusted) / len(part), "trusted_accuracy": sum(known) / len(known) if known else None,
                    "trusted_judged": len(known)})
        start = end
    return out


def trainer_time(summary: dict) -> dict:
    """The trainer's wall time by phase (summed over workers): its own steps, and what it waited for."""
    parts = {"steps": summary["trainer"]["busy_s"], **summary["trainer"].get("phase_s", {})}
    total = sum(parts.values())
    return {"seconds": parts, "idle_pct": 100 * parts.get("wait", 0.0) / total if total else None}


def _plots(out: Path, curve: list[dict], losses: list[dict], summary: dict, timing: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers / CI
    import matplotlib.pyplot as plt

    for name, draw in (("selection.png", lambda: _selection_figure(plt, curve)),
                       ("loss.png", lambda: _loss_figure(plt, losses)),
                       ("pipeline.png", lambda: _pipeline_figure(plt, summary, timing))):
        fig = draw()
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)


def _selection_figure(plt, curve: list[dict]):
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    x = [b["rows_before"] + b["rows"] / 2 for b in curve]
    top.plot(x, [100 * b["label_rate"] for b in curve], "o-", label="labelled (sent to the judge)")
    top.plot(x, [100 * b["trust"] for b in curve], "s-", label="trusted (pseudo-labelled)")
    top.set_ylabel("% of rows scored")
    top.set_ylim(-3, 103)
    top.legend(loc="center right")
    top.set_title("Selection as training goes on", fontsize=11)
    acc = [(xi, 100 * b["trusted_accuracy"]) for xi, b in zip(x, curve) if b["trusted_accuracy"] is not None]
    if acc:
        bottom.plot(*zip(*acc), "d-", color="tab:green")
    else:
        bottom.text(0.5, 0.5, "no trusted row with a known label", ha="center", va="center", transform=bottom.transAxes)
    bottom.set_ylabel("pseudo-label accuracy\non trusted rows (%)")
    bottom.set_ylim(-3, 103)
    bottom.set_xlabel("rows scored, in order of the scorer's model version")
    shown = curve[:: max(1, len(curve) // 6)]  # which weights scored them, on a top axis
    versions = top.secondary_xaxis("top")
    versions.set_xticks([b["rows_before"] + b["rows"] / 2 for b in shown],
                        labels=[f"v{b['versions'][0]}" for b in shown], fontsize=8)
    return fig


def _loss_figure(plt, losses: list[dict]):
    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = [m["step"] for m in losses]
    ax.plot(steps, [m["loss"] for m in losses], lw=0.8, alpha=0.5, label="loss per step")
    k = max(1, len(losses) // 20)
    smooth = [sum(m["loss"] for m in losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1])
              for i in range(len(losses))]
    ax.plot(steps, smooth, lw=2, label=f"mean of last {k}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Trainer loss")
    ax.legend()
    return fig


def _pipeline_figure(plt, summary: dict, timing: dict):
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    lags = {int(k): v for k, v in summary["lag_histogram"].items()}
    left.bar(list(lags), list(lags.values()), color="tab:purple")
    left.set_xlabel("lag (trainer version − scorer version)")
    left.set_ylabel("trained rows")
    left.set_title("Staleness of the scores")
    secs = timing["seconds"]
    right.barh(list(secs), list(secs.values()), color="tab:gray")
    right.set_xlabel("seconds (all workers)")
    idle = timing["idle_pct"]
    right.set_title("Trainer time" + (f": {idle:.0f}% waiting for rows" if idle is not None else ""))
    return fig


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def write_run_report(run_dir: str | Path) -> Path:
    """Write <run dir>/report/report.md and its PNGs from the finished run's files; return report.md's path."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = pq.read_table(run_dir / "outcomes.parquet").to_pylist()
    metrics = run_dir / "metrics.jsonl"
    losses = [m for m in map(json.loads, metrics.read_text().splitlines()) if not m["final"]] if metrics.exists() else []
    curve = selection_by_version(rows)
    timing = trainer_time(summary)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    _plots(out, curve, losses, summary, timing)
    rates = summary["stage_rows_per_s"]
    lines = [f"# Active run `{run_dir.name}`", "", f"**{verdict(summary)}**", "",
             f"{summary['rows_read']} rows, {summary['trainer']['optimizer_steps']} optimizer steps, "
             f"{summary['model_versions_published']} model versions published, {summary['wall_time_s']:.0f} s wall.",
             "", "## Outcomes", ""]
    lines += _table(["outcome", "rows", "%"], [[k, v, f"{100 * v / max(1, summary['rows_read']):.1f}"]
                                                for k, v in summary["outcomes"].items()])
    lines += ["", "## Selection over model versions", "", "![selection](selection.png)", ""]
    lines += _table(["versions", "rows", "labelled %", "trusted %", "trusted accuracy %"], [
        [f"{b['versions'][0]}–{b['versions'][1]}", b["rows"], f"{100 * b['label_rate']:.1f}", f"{100 * b['trust']:.1f}",
         "–" if b["trusted_accuracy"] is None else f"{100 * b['trusted_accuracy']:.1f} (n={b['trusted_judged']})"]
        for b in curve])
    audit = summary.get("audit", {})
    if audit.get("audited_rows"):
        lines += ["", f"Audited trusted rows: {audit['audited_rows']}, accuracy against the judge "
                      f"{audit['accuracy_vs_judge']}, 95% interval {audit['accuracy_vs_judge_95']}."]
    lines += ["", "## Loss", "", "![loss](loss.png)", "", "## Pipeline", "", "![pipeline](pipeline.png)", ""]
    lines += _table(["stage", "rows/s of its busy time"],
                    [[k, "–" if v is None else f"{v:.1f}"] for k, v in rates.items()])
    lines += ["", "Trainer wall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timing["seconds"].items()) + "."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(write_run_report(Path(sys.argv[1]).expanduser()))
