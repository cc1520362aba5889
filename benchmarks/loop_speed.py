"""B5: the streaming loop (`run_active`) against an in-process loop on a small model, rows/s without start-up.

Same backbone, rows, micro-batch, selection rule and oracle labels in both arms:
    in-process  benchmarks/pool_sim.simulate: score a micro-batch -> select -> label -> train, one process
    streaming   jobs/active_train's run_active: Ray Data scorer/selector/labeler -> Ray Train worker
Start-up is excluded on both sides: the in-process clock starts after the model is built and the rows are
tokenised; the streaming clock starts when the scorer reports its first scored rows (a watcher polls the run
coordinator) and stops at the trainer's last optimizer step. The streaming summary's per-stage busy seconds
say where the time goes.

    python benchmarks/loop_speed.py --rows 2000 --backbone runs/backbones/tiny_math      # ~4 min on 2 cores
    python benchmarks/loop_speed.py --dry_run                                           # 64 rows, structure only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# The recipe of docs/RESULTS.md (issue 17), so B5 measures the loop the experiment runs.
RECIPE = ["model.n_heads=8", "train.micro_batch_size=8", "train.total_steps=100000", "train.warmup_steps=20",
          "train.lr=3e-4", "train.head_lr=3e-3", "selection.mode=active"]


def in_process(rows: int, backbone: str, overrides: list[str]) -> dict:
    from pool_sim import simulate

    from actprm_ray.config import DEFAULT_CONFIG, load_config
    from actprm_ray.data.synthetic import MIXES, generate_pool

    cfg = load_config(DEFAULT_CONFIG, RECIPE + overrides)
    pool = generate_pool(rows, seed=0, mix=MIXES["addsub"])
    out = simulate(cfg, backbone, pool, {}, eval_every=10**9, log=lambda line: None)
    return {"rows": rows, "seconds": out["seconds"], "rows_per_s": rows / out["seconds"],
            "labels": out["final"]["labels"], "optimizer_steps": out["final"]["steps"]}


class Watcher(threading.Thread):
    """Polls the run coordinator: when scoring starts and when the trainer last stepped."""

    def __init__(self, run_name: str):
        super().__init__(daemon=True)
        self.run_name, self.stop = run_name, threading.Event()
        self.first_scored = self.last_step = None
        self.steps = 0

    def run(self) -> None:
        import ray

        from actprm_ray.pipeline.coordinator import get_coordinator

        while not self.stop.wait(0.25):
            if not ray.is_initialized():  # run_active connects; a call before that would start a second Ray
                continue
            try:
                s = ray.get(get_coordinator(self.run_name).snapshot.remote(), timeout=2)
            except Exception:  # noqa: BLE001 -- not up yet, or gone at the end
                continue
            now = time.time()
            if self.first_scored is None and s.get("scored", 0) > 0:
                self.first_scored = now
            if int(s.get("trained_steps", 0)) > self.steps:
                self.steps, self.last_step = int(s["trained_steps"]), now


def streaming(rows: int, backbone: str, overrides: list[str], work: Path) -> dict:
    from actprm_ray.config import load_config
    from actprm_ray.data.synthetic import MIXES, generate_pool, write_pool
    from actprm_ray.drivers.active import run_active

    pool = work / f"pool_{rows}.parquet"
    if not pool.exists():
        write_pool(generate_pool(rows, seed=0, mix=MIXES["addsub"]), pool)
    name = f"b5_{rows}_{int(time.time())}"
    cfg = load_config(None, RECIPE + [f"run.name={name}", f"run.output_dir={work}", f"data.pool={pool}",
                                      f"model.backbone={backbone}", "train.checkpoint_every=1000000",
                                      "pipeline.status_every_s=30", *overrides])
    watcher = Watcher(name)
    watcher.start()
    started = time.time()
    summary = run_active(cfg)
    watcher.stop.set()
    watcher.join()
    if watcher.first_scored is None or watcher.last_step is None:
        raise RuntimeError("the watcher never saw scoring start or a trainer step")
    steady = watcher.last_step - watcher.first_scored
    return {"rows": rows, "wall_s": time.time() - started, "startup_s": watcher.first_scored - started,
            "steady_s": steady, "rows_per_s": rows / steady, "labels": summary["labels_used"],
            "optimizer_steps": summary["trainer"]["optimizer_steps"], "stage_busy_s": summary["stage_busy_s"],
            "trainer_busy_s": summary["trainer"]["busy_s"], "trainer_phase_s": summary["trainer"]["phase_s"],
            "stage_rows_per_s": summary["stage_rows_per_s"], "lag_histogram": summary["lag_histogram"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--backbone", default=str(REPO / "runs" / "backbones" / "tiny_math"))
    ap.add_argument("--work", default=str(REPO / "runs" / "loop_speed"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "loop_speed.json"))
    ap.add_argument("--label", default="", help="a name for this measurement in the JSON (e.g. before/after)")
    ap.add_argument("--dry_run", action="store_true", help="64 rows: check the harness, not the speed")
    args, overrides = ap.parse_known_args(argv)
    rows = 64 if args.dry_run else args.rows
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.dry_run:  # a random-init tiny backbone: the harness, not the model, is under test
        from actprm_ray.model.tiny import build_tiny_backbone

        args.backbone = str(build_tiny_backbone(work / "tiny_backbone", size="tiny", seed=0))
        overrides = [*overrides, "model.n_heads=2"]
    plain = in_process(rows, args.backbone, list(overrides))
    ray_run = streaming(rows, args.backbone, list(overrides), work)
    result = {"label": args.label, "rows": rows, "backbone": args.backbone, "overrides": overrides,
              "load_avg_1m": os.getloadavg()[0], "in_process": plain, "streaming": ray_run,
              "ratio_rows_per_s": ray_run["rows_per_s"] / plain["rows_per_s"]}
    print(f"{'arm':<11} {'rows/s':>8} {'seconds':>8} {'labels':>7} {'steps':>6}")
    print(f"{'in-process':<11} {plain['rows_per_s']:8.1f} {plain['seconds']:8.1f} {plain['labels']:7d} "
          f"{plain['optimizer_steps']:6d}")
    print(f"{'streaming':<11} {ray_run['rows_per_s']:8.1f} {ray_run['steady_s']:8.1f} {ray_run['labels']:7d} "
          f"{ray_run['optimizer_steps']:6d}   (+{ray_run['startup_s']:.0f} s start-up; busy s: "
          f"score {ray_run['stage_busy_s']['score']:.1f}, label {ray_run['stage_busy_s']['label']:.1f}, "
          f"train {ray_run['trainer_busy_s']:.1f})")
    print("trainer wall s besides its own steps: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                             ray_run["trainer_phase_s"].items()))
    print(f"ratio streaming / in-process: {result['ratio_rows_per_s']:.2f}")
    if not args.dry_run or args.out != ap.get_default("out"):  # a dry run writes only where it is told
        out = Path(args.out)
        history = json.loads(out.read_text()) if out.is_file() else []
        out.write_text(json.dumps(history + [result], indent=1))
    return result


if __name__ == "__main__":
    main()
