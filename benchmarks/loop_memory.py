"""Loop memory: jobs/active_train.py on growing synthetic pools, peak memory of the whole Ray process tree.

Backpressure (issue 3) bounds the rows in flight by configuration, so the loop's memory must not grow with the
pool. Each size runs `python jobs/active_train.py` as a subprocess (its own local Ray instance) on the embedded
default (tiny model, oracle labeler) with `data.synthetic_rows=N`; `TreeMemory` (shared with B2) samples Σ PSS
over the driver, GCS, raylet + object store and every worker. Reported per size: wall time, end-to-end rows/s,
per-stage rows/s from the summary, peak Σ PSS, and Σ PSS in each quarter of the run (flat over time too).

    python benchmarks/loop_memory.py                       # 1,000 and 4,000 rows, ~15 min on a 2-core machine
    python benchmarks/loop_memory.py --rows 500 1000       # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from filter_scale import run_sampled

REPO = Path(__file__).resolve().parents[1]


def run_size(n: int, work: Path, sample_s: float) -> dict:
    from actprm_ray.pipeline.ray_env import RAY_ENV_DEFAULTS

    env = {**os.environ, **RAY_ENV_DEFAULTS, "PYTHONUNBUFFERED": "1"}
    name = f"loop_{n}"
    cmd = [sys.executable, str(REPO / "jobs" / "active_train.py"), f"run.output_dir={work}", f"run.name={name}",
           f"data.synthetic_rows={n}", "train.total_steps=100000", "pipeline.status_every_s=30"]
    rc, wall, mem = run_sampled(cmd, env, work / f"{name}.log", sample_s, cwd=REPO)
    if rc != 0:
        raise SystemExit(f"active_train failed for {n} rows (exit {rc}); see {work / f'{name}.log'}")
    summary = json.loads((work / name / "summary.json").read_text())
    pss = [s[2] for s in mem.samples]
    quarters = [max(pss[i * len(pss) // 4:(i + 1) * len(pss) // 4] or [0]) / 2**30 for i in range(4)]
    return {"rows": n, "wall_s": wall, "identity_holds": summary["identity_holds"], "outcomes": summary["outcomes"],
            "stage_rows_per_s": summary["stage_rows_per_s"], "trust_pct": summary["trust_pct"],
            "peak_pss_gib": max(pss) / 2**30, "peak_rss_gib": max(s[1] for s in mem.samples) / 2**30,
            "pss_by_quarter_gib": quarters, "samples": len(pss)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1000, 4000])
    ap.add_argument("--sample_s", type=float, default=1.0)
    ap.add_argument("--work", default="/tmp/actprm_loop_memory")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "loop_memory.json"))
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = [run_size(n, work, a.sample_s) for n in a.rows]
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "runs": runs,
              "peak_pss_ratio": runs[-1]["peak_pss_gib"] / runs[0]["peak_pss_gib"]}
    print(f"{'rows':>7} {'wall s':>7} {'rows/s':>7} {'score/s':>8} {'train/s':>8} {'peak PSS GiB':>13} "
          f"{'PSS by quarter GiB':>24} identity")
    for r in runs:
        q = " ".join(f"{x:.2f}" for x in r["pss_by_quarter_gib"])
        print(f"{r['rows']:>7} {r['wall_s']:>7.0f} {r['rows'] / r['wall_s']:>7.1f} "
              f"{r['stage_rows_per_s']['score']:>8.1f} {r['stage_rows_per_s']['train']:>8.1f} "
              f"{r['peak_pss_gib']:>13.2f} {q:>24} {r['identity_holds']}")
    print(f"peak Σ PSS ratio {a.rows[-1]} / {a.rows[0]} rows: {report['peak_pss_ratio']:.2f} (flat = 1.0)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
