"""B1: overhead of the Ray filter pipeline over a plain single-process loop, on this machine's CPUs.

Both arms score the same rows with the same checkpoint (the compute-bound "small" tiny backbone: hidden 256,
4 layers, 32 heads), the same chunks and the same forward batch size, with one torch thread each (a Ray
actor with a fractional CPU gets OMP_NUM_THREADS=1; the plain loop is pinned to match):
    plain  read Parquet with pyarrow -> encode_trajectory -> score_encoded -> is_uncertain -> write Parquet
    ray    actprm_ray.drivers.filter.run_filter (Ray started beforehand; actor start-up and model load count)
The plain loop runs before and after the Ray run, so drift from other load on the machine shows. Ratio =
plain wall / Ray wall (>= 1: the pipeline costs nothing; its tokeniser runs beside the scorer on the second core).

Wall clock on a shared 2-core machine swings with other people's load, so CPU time is measured too (a sampler
keeps each process's last CPU seconds, so exited actors still count): the scorer actor's CPU seconds against
the plain loop's (same work: ~1.0 means no per-row overhead in the scorer), and all Ray processes' CPU seconds
(driver, raylet, GCS, every worker: start-up, tokenising, scheduling, serialisation, writing). The projected
ratio for an unloaded 2-core machine is plain CPU / max(scorer CPU, total Ray CPU / 2).

    python benchmarks/pipeline_overhead.py [--rows 768] [--out results/pipeline_overhead.json]
    python benchmarks/pipeline_overhead.py --dry_run                 # 32 rows, tiny model (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


class TreeCPU(threading.Thread):
    """Last-seen user+system CPU seconds of every descendant of this process, sampled every `every_s` seconds."""

    def __init__(self, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.every_s, self.stop, self.cpu, self.cmd = every_s, threading.Event(), {}, {}

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.is_set():
            for p in me.children(recursive=True):
                try:
                    t = p.cpu_times()
                    self.cpu[p.pid] = t.user + t.system
                    # A Ray worker's title changes (python default_worker.py -> ray::IDLE -> ray::MapWorker(...)).
                    self.cmd.setdefault(p.pid, set()).add(" ".join(p.cmdline()))
                except Exception:  # noqa: BLE001 -- the process ended between listing and reading
                    continue
            self.stop.wait(self.every_s)


def plain_filter(shards: list[str], model_dir: Path, out_dir: Path, *, chunk_rows: int, batch_size: int,
                 delta_pred: float, delta_std: float, threads: int) -> dict:
    """The single-process baseline: same format, same scorer function, same selection rule, no Ray."""
    import torch

    from actprm_ray.data.step_format import StepFormatError, encode_trajectory
    from actprm_ray.model.ensemble_prm import EnsemblePRM
    from actprm_ray.model.scoring import score_encoded
    from actprm_ray.select import is_uncertain

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = EnsemblePRM.from_pretrained(model_dir).eval()
    cfg = model.config
    encode_s = score_s = 0.0
    rows_read = retained = 0
    out_dir.mkdir(parents=True, exist_ok=True)
    for k, shard in enumerate(shards):
        kept = []
        for rb in pq.ParquetFile(shard).iter_batches(batch_size=chunk_rows, columns=["id", "question", "steps"]):
            rows = rb.to_pylist()
            rows_read += len(rows)
            t = time.perf_counter()
            enc, ok = [], []
            for r in rows:
                try:
                    e = encode_trajectory(model.tokenizer, r["question"], r["steps"], sep=cfg.sep,
                                          system_prompt=cfg.system_prompt, max_length=2048)
                except StepFormatError:
                    continue
                enc.append({"input_ids": e.input_ids, "readout_positions": e.readout_positions})
                ok.append(r)
            encode_s += time.perf_counter() - t
            t = time.perf_counter()
            scores = score_encoded(model, enc, batch_size=batch_size)
            score_s += time.perf_counter() - t
            for r, s in zip(ok, scores):
                if is_uncertain(s["step_mean"], s["step_std"], delta_pred=delta_pred, delta_std=delta_std):
                    kept.append({"id": r["id"], "step_mean": s["step_mean"], "step_std": s["step_std"]})
        retained += len(kept)
        pq.write_table(pa.Table.from_pylist(kept, schema=pa.schema([
            ("id", pa.string()), ("step_mean", pa.list_(pa.float32())), ("step_std", pa.list_(pa.float32()))])),
            out_dir / f"part-{k:05d}.parquet")
    return {"wall_s": time.perf_counter() - t0, "encode_s": encode_s, "score_s": score_s, "rows": rows_read,
            "retained": retained}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=None, help="rows in total (default 768; dry run 32)")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--chunk_rows", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=16, help="rows per forward, both arms")
    ap.add_argument("--size", default=None, help="tiny backbone size (default small; dry run tiny)")
    ap.add_argument("--n_heads", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the scorer, both arms")
    ap.add_argument("--dry_run", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "pipeline_overhead.json"))
    a = ap.parse_args(argv)
    rows = a.rows or (32 if a.dry_run else 768)
    size = a.size or ("tiny" if a.dry_run else "small")

    from actprm_ray.config import load_config
    from actprm_ray.data.step_format import DEFAULT_SEP, DEFAULT_SYSTEM_PROMPT
    from actprm_ray.data.synthetic import generate_pool, write_pool
    from actprm_ray.model.ensemble_prm import EnsemblePRM, PRMConfig
    from actprm_ray.model.tiny import build_tiny_backbone
    from actprm_ray.drivers.filter import FilterArgs, run_filter
    from actprm_ray.pipeline.ray_env import init_ray

    work = Path(tempfile.mkdtemp(prefix="b1_"))
    ckpt = EnsemblePRM.from_backbone(build_tiny_backbone(work / "backbone", size=size), PRMConfig(
        n_heads=a.n_heads, sep=DEFAULT_SEP, system_prompt=DEFAULT_SYSTEM_PROMPT)).save_pretrained(work / "ckpt")
    pool = generate_pool(rows, seed=1)
    per = -(-rows // a.shards)
    shards = []
    for k in range(a.shards):
        shards.append(str(work / "pool" / f"shard-{k}.parquet"))
        write_pool(pool[k * per:(k + 1) * per], shards[-1])
    # Fresh heads put µ near 0.5, so the aleatoric test would keep every row; disable it (δ_pred = 0.5) and let
    # the epistemic one split the set, so both arms also write a realistic share of rows.
    delta_pred, delta_std = 0.5, 0.0068

    cpu0 = time.process_time()
    plain = [plain_filter(shards, ckpt, work / "plain0", chunk_rows=a.chunk_rows, batch_size=a.batch_size,
                          delta_pred=delta_pred, delta_std=delta_std, threads=a.threads)]
    plain[0]["cpu_s"] = time.process_time() - cpu0
    t = time.perf_counter()
    init_ray(num_cpus=None, no_progress_timeout_s=300)
    ray_init_s = time.perf_counter() - t
    cfg = load_config(overrides=[f"selection.delta_pred={delta_pred}", f"selection.delta_std={delta_std}",
                                 f"pipeline.score_batch_size={a.batch_size}", "pipeline.status_every_s=30"])
    sampler = TreeCPU()
    sampler.start()
    time.sleep(2 * sampler.every_s)
    before = dict(sampler.cpu)  # the idle Ray processes' CPU so far (ray.init): not the pipeline's
    t, driver_cpu = time.perf_counter(), time.process_time()
    summary = run_filter(cfg, FilterArgs(checkpoint=str(ckpt), input=str(work / "pool"), output=str(work / "ray"),
                                         chunk_rows=a.chunk_rows), torch_threads=a.threads)
    ray_s, driver_cpu = time.perf_counter() - t, time.process_time() - driver_cpu
    time.sleep(2 * sampler.every_s)
    sampler.stop.set()
    spent = {pid: c - before.get(pid, 0.0) for pid, c in sampler.cpu.items()}
    scorer_cpu = sum(c for pid, c in spent.items() if any("FilterScoreStage" in t for t in sampler.cmd.get(pid, ())))
    ray_cpu = driver_cpu + sum(spent.values())
    cpu0 = time.process_time()
    plain.append(plain_filter(shards, ckpt, work / "plain1", chunk_rows=a.chunk_rows, batch_size=a.batch_size,
                              delta_pred=delta_pred, delta_std=delta_std, threads=a.threads))
    plain[1]["cpu_s"] = time.process_time() - cpu0

    ray_ids = set(pq.read_table(work / "ray" / "retained", columns=["id"]).column("id").to_pylist())
    plain_ids = set(pq.read_table(work / "plain0", columns=["id"]).column("id").to_pylist())
    plain_wall = sum(p["wall_s"] for p in plain) / len(plain)
    report = {
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f} at the end",
        "rows": rows, "shards": a.shards, "chunk_rows": a.chunk_rows, "batch_size": a.batch_size,
        "backbone": size, "n_heads": a.n_heads, "threads": a.threads,
        "plain_runs": plain, "plain_wall_s": plain_wall, "ray_init_s": ray_init_s, "ray_wall_s": ray_s,
        "plain_rows_per_s": rows / plain_wall, "ray_rows_per_s": rows / ray_s,
        "ratio_ray_over_plain_throughput": plain_wall / ray_s,
        "ratio_vs_plain_score_only": sum(p["score_s"] for p in plain) / len(plain) / ray_s,
        "ray_pipeline_timing": summary["pipeline_timing"],
        # Steady state: Ray's rows/s over the second half of the rows (start-up excluded) over plain's rows/s.
        "ratio_steady_state": (summary["pipeline_timing"]["steady_rows_per_s"] or 0) / (rows / plain_wall),
        "same_retained_rows": ray_ids == plain_ids, "retained": summary["retained"],
    }
    plain_cpu = sum(p["cpu_s"] for p in plain) / len(plain)
    report["cpu"] = {"plain_s": plain_cpu, "ray_scorer_actor_s": scorer_cpu, "ray_all_processes_s": ray_cpu,
                     "ray_driver_s": driver_cpu, "scorer_efficiency": plain_cpu / scorer_cpu if scorer_cpu else None,
                     "projected_ratio_2_free_cores": plain_cpu / max(scorer_cpu, ray_cpu / 2) if scorer_cpu else None}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(f"\nB1 pipeline overhead: {report['machine']}; {rows} rows, '{size}' backbone, {a.n_heads} heads, "
          f"batch {a.batch_size}, {a.threads} torch thread(s)")
    print(f"{'arm':<22} {'wall s':>8} {'rows/s':>8}")
    for i, p in enumerate(plain):
        print(f"{'plain (run ' + str(i + 1) + ')':<22} {p['wall_s']:>8.1f} {rows / p['wall_s']:>8.2f}"
              f"   encode {p['encode_s']:.1f}s, score {p['score_s']:.1f}s")
    print(f"{'ray filter':<22} {ray_s:>8.1f} {rows / ray_s:>8.2f}   (+ ray.init {ray_init_s:.1f}s, not counted)")
    tm = summary["pipeline_timing"]
    print(f"{'ray, steady state':<22} {'':>8} {tm['steady_rows_per_s'] or 0:>8.2f}   (arrival slope over the second half; bursty under load; "
          f"first chunk out after {tm['startup_s']:.1f}s: actors, model load)")
    print(f"ratio (Ray throughput / plain throughput) = {report['ratio_ray_over_plain_throughput']:.2f} end to end, "
          f"{report['ratio_steady_state']:.2f} steady state; "
          f"vs plain scoring time alone = {report['ratio_vs_plain_score_only']:.2f}; "
          f"same retained rows: {report['same_retained_rows']}")
    c = report["cpu"]
    if c["scorer_efficiency"]:
        print(f"CPU seconds: plain {c['plain_s']:.1f}; Ray scorer actor {c['ray_scorer_actor_s']:.1f} (plain/scorer = "
              f"{c['scorer_efficiency']:.2f}); all Ray processes {c['ray_all_processes_s']:.1f} -> projected ratio on 2 "
              f"free cores {c['projected_ratio_2_free_cores']:.2f}")
    print(f"JSON: {a.out}")
    return report


if __name__ == "__main__":
    main()
