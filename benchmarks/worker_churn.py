"""Ray worker churn: waves of short tasks next to fractional-CPU actors, Ray's idle-worker keep-alive vs ours.

Why it exists: B2's 1M-row filter dropped from 167 to ~131 rows/s at minute 11 and started 645 worker processes
over its two hours (the 100K run: 12). Ray (2.60) kills an idle task worker once it has been idle for
idle_worker_killing_time_threshold_ms (default 1 s) and the node has more idle workers than free CPUs. The stage
actors hold fractional CPUs, so on a small node that is the normal state, and Ray Data's short read/select tasks
kept landing on freshly started workers that first spend seconds importing. actprm_ray raises the threshold
(RAY_ENV_DEFAULTS in actprm_ray/pipeline/ray_env.py).

The same pattern without Ray Data: a local 2-CPU instance, two actors at 0.25 CPU, and --waves waves of --burst
tasks (0.25 CPU each, importing torch like our stage modules do), --gap_s seconds apart. Each setting runs in a
fresh subprocess. The run is a count of waves, not a length of time, so a slow machine (the first wave's cold
imports take 10+ s) still gets every wave. Reported: worker processes the raylet started (its per-worker log
files; the actors' two included), how many distinct ones ran a task, and seconds per wave.

    python benchmarks/worker_churn.py                 # 2 x 36 waves (~90 s each)
    python benchmarks/worker_churn.py --dry_run       # 2 x 8 waves (~35 s each, CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from actprm_ray.pipeline.ray_env import RAY_ENV_DEFAULTS  # noqa: E402  (after the path above)

KEEP_ALIVE = "RAY_idle_worker_killing_time_threshold_ms"


def run_waves(n_waves: int, burst: int, gap_s: float) -> dict:
    """Runs in the child: one local Ray instance, `n_waves` waves of `burst` tasks, `gap_s` apart."""
    import ray

    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=0.25)
    class Holder:  # stands in for a stage actor (canonicalize, score): holds a CPU share, does nothing here
        def ping(self) -> int:
            return os.getpid()

    @ray.remote(num_cpus=0.25)
    def short_task() -> int:
        import torch  # noqa: F401  (a cold worker pays this import, as Ray Data's workers pay ours)

        time.sleep(0.05)
        return os.getpid()

    holders = [Holder.remote() for _ in range(2)]
    ray.get([h.ping.remote() for h in holders])
    pids: set[int] = set()
    wave_s: list[float] = []
    t0 = time.perf_counter()
    for _ in range(n_waves):
        t = time.perf_counter()
        pids.update(ray.get([short_task.remote() for _ in range(burst)]))
        wave_s.append(time.perf_counter() - t)
        time.sleep(gap_s)
    # Every worker process the raylet starts writes one of these, including those it kills before they run a task.
    started = len(list((Path(ctx.address_info["session_dir"]) / "logs").glob("python-core-worker-*.log")))
    ray.shutdown()
    return {"waves": len(wave_s), "seconds": round(time.perf_counter() - t0, 1), "workers_started": started,
            "workers_that_ran_tasks": len(pids), "wave_s_median": statistics.median(wave_s),
            "wave_s_mean": statistics.mean(wave_s), "wave_s_max": max(wave_s)}


def run_setting(keep_alive_ms: str | None, a: argparse.Namespace) -> dict:
    # The environment our jobs give a local Ray, with and without the one setting under test.
    env = {**os.environ, **RAY_ENV_DEFAULTS, "PYTHONUNBUFFERED": "1"}
    env.pop(KEEP_ALIVE)
    if keep_alive_ms is not None:
        env[KEEP_ALIVE] = keep_alive_ms
    cmd = [sys.executable, __file__, "--child", "--waves", str(a.waves), "--burst", str(a.burst),
           "--gap_s", str(a.gap_s)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.waves * (a.gap_s + 10) + 300)
    if r.returncode != 0:
        raise SystemExit(f"child failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    return {"setting": f"{KEEP_ALIVE}={keep_alive_ms}" if keep_alive_ms else "Ray default (1000 ms)", **result}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--waves", type=int, default=None, help="waves of tasks per setting (default 36; dry 8)")
    ap.add_argument("--burst", type=int, default=6, help="tasks per wave")
    ap.add_argument("--gap_s", type=float, default=2.0, help="pause between waves (> Ray's 1 s default keep-alive)")
    ap.add_argument("--dry_run", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "worker_churn.json"))
    a = ap.parse_args(argv)
    a.waves = a.waves or (8 if a.dry_run else 36)
    if a.child:
        print(json.dumps(run_waves(a.waves, a.burst, a.gap_s)))
        return {}

    runs = [run_setting(None, a), run_setting(RAY_ENV_DEFAULTS[KEEP_ALIVE], a)]
    report = {"machine": f"{platform.node()}, {os.cpu_count()} CPUs", "waves": a.waves, "burst": a.burst,
              "gap_s": a.gap_s, "runs": runs}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(f"\nWorker churn: {report['machine']}; waves of {a.burst} tasks {a.gap_s} s apart, {a.waves} waves, "
          "next to two 0.25-CPU actors")
    print(f"{'setting':<48} {'waves':>6} {'workers started':>16} {'ran tasks':>10} {'wave s median':>14} "
          f"{'wave s max':>11}")
    for r in runs:
        print(f"{r['setting']:<48} {r['waves']:>6} {r['workers_started']:>16} {r['workers_that_ran_tasks']:>10} "
              f"{r['wave_s_median']:>14.2f} {r['wave_s_max']:>11.2f}")
    print(f"JSON: {a.out}")
    return report


if __name__ == "__main__":
    main()
