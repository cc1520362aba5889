"""B2: jobs/filter.py over 100K and 1M synthetic rows with the tiny model: wall time, rows/s and peak memory.

Each size runs `python jobs/filter.py` as a subprocess (its own local Ray instance, started from scratch) over a
synthetic pool in shards of --shard_rows rows. A thread samples the memory of the whole process tree (the
driver, GCS, raylet with the object store, every worker) every --sample_s seconds:
    Σ RSS  resident memory summed over the processes (shared pages, such as object-store pages mapped by
           several processes, count once per process: an upper bound)
    Σ PSS  proportional set size summed (each shared page split between the processes mapping it): the
           memory the run really holds, object store included
    driver  the filter driver's own PSS (the process that once received every retained row), and the bytes
            it received from the pipeline (filter_summary.json's pipeline_timing.driver_bytes)
The goal (issue 6): peak(1M) <= 1.2 x peak(100K), time linear in rows.

    python benchmarks/filter_scale.py --rows 100000                # ~20-30 min on a 2-core machine
    python benchmarks/filter_scale.py --rows 100000 1000000        # the 1M run takes hours on 2 cores
    python benchmarks/filter_scale.py --dry_run                    # 200 and 400 rows (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing


class TreeMemory(threading.Thread):
    """Samples Σ RSS and Σ PSS over a process and all its descendants until stopped."""

    def __init__(self, pid: int, every_s: float):
        super().__init__(daemon=True)
        self.pid, self.every_s, self.stop = pid, every_s, threading.Event()
        self.samples: list[tuple[float, int, int, int]] = []  # (t, Σrss, Σpss, processes)
        self.driver_peak_pss = 0  # the root process (the job's driver) alone
        self.peak_breakdown: list[tuple[str, int]] = []

    def run(self) -> None:
        import psutil

        t0 = time.time()
        while not self.stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            rss = pss = 0
            parts = []
            for p in procs:
                try:
                    info = p.memory_full_info()
                    rss, pss = rss + info.rss, pss + info.pss
                    parts.append((p.name(), info.pss))
                    if p.pid == self.pid:
                        self.driver_peak_pss = max(self.driver_peak_pss, info.pss)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            if not self.samples or pss > max(s[2] for s in self.samples):
                self.peak_breakdown = sorted(parts, key=lambda x: -x[1])[:8]
            self.samples.append((time.time() - t0, rss, pss, len(procs)))
            self.stop.wait(self.every_s)


def run_sampled(cmd: list[str], env: dict, log_path: Path, sample_s: float, cwd=None) -> tuple[int, float, TreeMemory]:
    """Run cmd with its output in log_path while TreeMemory samples its process tree; (exit code, wall s, samples)."""
    t = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        mem = TreeMemory(proc.pid, sample_s)
        mem.start()
        rc = proc.wait()
        mem.stop.set()
        mem.join()
    return rc, time.perf_counter() - t, mem


def make_pool(n: int, shard_rows: int, directory: Path, seed: int = 0) -> float:
    """Write n synthetic rows as shards of shard_rows rows (one chunk of rows in memory at a time); seconds taken."""
    from actprm_ray.data.synthetic import iter_pool, write_pool

    marker = directory / "_complete"
    if marker.exists():
        return 0.0
    shutil.rmtree(directory, ignore_errors=True)
    t = time.perf_counter()
    for k, rows in enumerate(iter_pool(n, seed=seed, chunk=shard_rows)):
        write_pool(rows, directory / f"shard-{k:05d}.parquet")
    marker.write_text(str(n))
    return time.perf_counter() - t


def run_size(n: int, pool: Path, ckpt: Path, out: Path, chunk_rows: int, sample_s: float, resume: bool = False) -> dict:
    if not resume:
        shutil.rmtree(out, ignore_errors=True)
    from actprm_ray.pipeline.ray_env import RAY_ENV_DEFAULTS

    env = {**os.environ, **RAY_ENV_DEFAULTS, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(REPO / "jobs" / "filter.py"), "--checkpoint", str(ckpt), "--input", str(pool),
           "--output", str(out), "--chunk_rows", str(chunk_rows), "pipeline.status_every_s=60"]
    log_path = out.parent / f"{out.name}{'.resumed' if resume else ''}.log"
    rc, wall, mem = run_sampled(cmd, env, log_path, sample_s)
    if rc != 0:
        raise RuntimeError(f"filter run for {n} rows failed (rc {rc}); log: {log_path}")
    summary = json.loads((out / "filter_summary.json").read_text())
    peak_rss = max(s[1] for s in mem.samples)
    peak_pss = max(s[2] for s in mem.samples)
    step = max(1, len(mem.samples) // 200)
    scored = summary["rows_scored_this_run"]
    return {"rows": n, "rows_scored_this_run": scored, "shards_skipped": summary["shards_skipped"], "wall_s": wall,
            "rows_per_s": scored / wall, "filter_summary_wall_s": summary["wall_time_s"],
            "pipeline_timing": summary["pipeline_timing"], "retained": summary["retained"],
            "retained_fraction": summary["retained_fraction"], "peak_rss_gib": peak_rss / 2**30,
            "peak_pss_gib": peak_pss / 2**30, "driver_peak_pss_mib": mem.driver_peak_pss / 2**20,
            "driver_bytes": summary["pipeline_timing"].get("driver_bytes"), "peak_breakdown_pss_mib": [(k, v / 2**20) for k, v in mem.peak_breakdown],
            "memory_timeline": [(round(s[0], 1), round(s[1] / 2**20), round(s[2] / 2**20), s[3])
                                for s in mem.samples[::step]],
            "log": str(log_path)}


def make_report(runs: list[dict], n_heads: int, shard_rows: int, chunk_rows: int) -> dict:
    report = {"machine": f"{platform.node()}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f} at the end",
              "model": f"tiny backbone (hidden 64, 2 layers), {n_heads} heads", "shard_rows": shard_rows,
              "chunk_rows": chunk_rows, "runs": runs}
    if len(runs) >= 2:
        small, big = runs[0], runs[-1]
        report["peak_pss_ratio"] = big["peak_pss_gib"] / small["peak_pss_gib"]
        report["peak_rss_ratio"] = big["peak_rss_gib"] / small["peak_rss_gib"]
        report["time_per_row_ratio"] = (big["wall_s"] / big["rows"]) / (small["wall_s"] / small["rows"])
    return report


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=None, help="pool sizes (default 100000; dry run 200 400)")
    ap.add_argument("--shard_rows", type=int, default=None, help="rows per input shard (default 10000)")
    ap.add_argument("--chunk_rows", type=int, default=None, help="rows per chunk (default 1024)")
    ap.add_argument("--n_heads", type=int, default=32)
    ap.add_argument("--sample_s", type=float, default=2.0)
    ap.add_argument("--work", default=None, help="pools, checkpoint and outputs (default /tmp/actprm_b2[_dry])")
    ap.add_argument("--dry_run", action="store_true")
    ap.add_argument("--resume", action="store_true", help="keep an existing output (resume a killed run): only its "
                    "unfinished shards are scored and measured")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "filter_scale.json"))
    a = ap.parse_args(argv)
    sizes = a.rows or ([200, 400] if a.dry_run else [100_000])
    shard_rows = a.shard_rows or (100 if a.dry_run else 10_000)
    chunk_rows = a.chunk_rows or (64 if a.dry_run else 1024)
    work = Path(a.work or ("/tmp/actprm_b2_dry" if a.dry_run else "/tmp/actprm_b2"))
    work.mkdir(parents=True, exist_ok=True)

    from actprm_ray.data.step_format import DEFAULT_SEP, DEFAULT_SYSTEM_PROMPT
    from actprm_ray.model.ensemble_prm import EnsemblePRM, PRMConfig
    from actprm_ray.model.tiny import build_tiny_backbone

    ckpt = work / "ckpt"
    if not (ckpt / "config.json").exists():
        EnsemblePRM.from_backbone(build_tiny_backbone(work / "backbone", size="tiny"), PRMConfig(
            n_heads=a.n_heads, sep=DEFAULT_SEP, system_prompt=DEFAULT_SYSTEM_PROMPT)).save_pretrained(ckpt)
    runs = []
    for n in sizes:
        gen_s = make_pool(n, shard_rows, work / f"pool_{n}")
        print(f"[b2] {n} rows: pool ready ({gen_s:.0f}s to generate); filtering ...", flush=True)
        r = run_size(n, work / f"pool_{n}", ckpt, work / f"out_{n}", chunk_rows, a.sample_s, a.resume)
        r["pool_generation_s"] = gen_s
        runs.append(r)
        print(f"[b2] {n} rows: {r['wall_s']:.0f}s, peak Σ PSS {r['peak_pss_gib']:.2f} GiB", flush=True)
        # Written after every size: a long run cut short still leaves the sizes it finished.
        report = make_report(runs, a.n_heads, shard_rows, chunk_rows)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=2))
    print(f"\nB2 filter scale: {report['machine']}; {report['model']}; shards of {shard_rows} rows, chunks of {chunk_rows}")
    print(f"{'rows':>9} {'wall s':>8} {'rows/s':>8} {'steady rows/s':>14} {'start-up s':>10} {'peak ΣRSS GiB':>14} "
          f"{'peak ΣPSS GiB':>14} {'driver PSS MiB':>14} {'driver MiB in':>13} {'retained':>9}")
    for r in runs:
        t = r["pipeline_timing"]
        print(f"{r['rows']:>9} {r['wall_s']:>8.0f} {r['rows_per_s']:>8.1f} {t['steady_rows_per_s'] or 0:>14.1f} "
              f"{t['startup_s']:>10.1f} {r['peak_rss_gib']:>14.2f} {r['peak_pss_gib']:>14.2f} "
              f"{r['driver_peak_pss_mib']:>14.0f} {(r['driver_bytes'] or 0) / 2**20:>13.2f} {r['retained']:>9}")
    if len(runs) >= 2:
        print(f"peak ΣPSS ratio {report['peak_pss_ratio']:.2f} (goal <= 1.2), time per row ratio "
              f"{report['time_per_row_ratio']:.2f} (1.0 = linear)")
    print(f"JSON: {a.out}")
    return report


if __name__ == "__main__":
    main()
