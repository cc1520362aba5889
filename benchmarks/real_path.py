"""The paper's data path end to end on a real small model, on CPU (issue 16 item 3), timed per stage.

    generate (SmolLM2 rollouts on GSM8K train problems, vLLM)
      [extended: -> active_train (stage 1: streaming loop, vLLM judge, on the generated pool)]
      -> filter (score once with the stage-1 checkpoint, or fresh heads; keep the uncertain rows)
      -> label (the vLLM judge, SmolLM2-Instruct, held to the <analysis_j>/<conclusion> grammar by structured outputs)
      -> train (stage 2, from the stage-1 checkpoint)
      -> evaluate (ProcessBench slice)

Every stage is the job a user runs (jobs/*.py in its own process, with conf/real_small.yaml), so each wall time
includes the process's imports, its own local Ray instance and its vLLM engine start. SmolLM2-135M-Instruct is
the PRM backbone, the policy and the judge (model/import_gguf.py converts it once into the models cache).

    python benchmarks/real_path.py                           # extended size, writes benchmarks/results/real_path_cpu.json
    python benchmarks/real_path.py --size ci --out /tmp/x.json

tests/test_real_path.py runs the `ci` size in `make test` and the `extended` size in the extended tier.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "conf" / "real_small.yaml"
SHARED_DATA = Path(os.environ.get("ACTPRM_SHARED_DATA", REPO / ".." / "shared" / "data"))
ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
       "HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}

# problems x samples rollouts; judge and policy token caps; ProcessBench rows per subset; stage 1 on or off.
SIZES = {
    "ci": dict(problems=2, samples=2, policy_tokens=64, judge_tokens=128, eval_limit=1, stage1=False),
    "extended": dict(problems=8, samples=2, policy_tokens=192, judge_tokens=256, eval_limit=3, stage1=True),
}


class StageFailed(RuntimeError):
    pass


def run_stage(name: str, cmd: list[str], work: Path, timeout: int) -> dict:
    """Run one job in its own process; its log goes to work/<name>.log. Returns {wall_s, cmd, log}."""
    log = work / f"{name}.log"
    env = {**os.environ, **ENV}
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise StageFailed(f"{name} exited {proc.returncode} after {wall:.0f} s:\n{tail}")
    return {"wall_s": round(wall, 1), "cmd": [str(c) for c in cmd[1:]], "log": str(log)}


def run_path(work: str | Path, size: str = "ci", *, timeout: int = 1200) -> dict:
    """Run the whole path under `work`; returns per-stage wall times and the outputs' paths and summaries."""
    s = SIZES[size]
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    py, jobs = sys.executable, REPO / "jobs"
    common = ["--config", str(PROFILE), f"run.output_dir={work / 'runs'}", "run.ray_num_cpus=2",
              f"labeler.judge.max_tokens={s['judge_tokens']}"]
    problems = SHARED_DATA / "problems" / "gsm8k" / "train.jsonl"
    rollouts = work / "rollouts"  # a pool folder: one Parquet shard per generate.shard_size problems
    report: dict = {"size": size, "settings": s, "stages": {}, "paths": {}}
    stages = report["stages"]

    stages["generate"] = run_stage("generate", [
        py, jobs / "generate.py", *common, f"generate.problems_path={problems}", f"generate.out_dir={rollouts}",
        f"generate.limit={s['problems']}", f"generate.samples_per_problem={s['samples']}",
        f"generate.max_tokens={s['policy_tokens']}"], work, timeout)
    stages["generate"]["summary"] = json.loads((rollouts / "_summary.json").read_text())
    report["paths"]["rollouts"] = str(rollouts)

    stage1 = None
    if s["stage1"]:
        stages["active_train"] = run_stage("active_train", [
            py, jobs / "active_train.py", *common, "run.name=stage1", f"data.pool={rollouts}"], work, timeout)
        summary = json.loads((work / "runs" / "stage1" / "summary.json").read_text())
        stages["active_train"]["summary"] = summary
        stage1 = summary["checkpoint"]
        report["paths"]["stage1"] = str(work / "runs" / "stage1")

    filtered = work / "filter"
    cmd = [py, jobs / "filter.py", *common, "run.name=filter", f"--input={rollouts}", f"--output={filtered}"]
    if stage1:
        cmd.append(f"--checkpoint={stage1}")
    stages["filter"] = run_stage("filter", cmd, work, timeout)
    stages["filter"]["summary"] = json.loads((filtered / "filter_summary.json").read_text())
    stage1 = stage1 or str(work / "runs" / "filter" / "init")  # no stage 1: the filter's fresh heads are the start

    labels = work / "labels"
    stages["label"] = run_stage("label", [py, jobs / "label.py", *common, f"--input={filtered / 'retained'}",
                                          f"--output={labels}"], work, timeout)
    stages["label"]["summary"] = json.loads((labels / "label_summary.json").read_text())

    stages["train"] = run_stage("train", [py, jobs / "train.py", *common, "run.name=stage2",
                                          f"--init_checkpoint={stage1}", f"data.pool={labels / 'labelled'}"],
                                work, timeout)
    summary = json.loads((work / "runs" / "stage2" / "summary.json").read_text())
    stages["train"]["summary"] = summary
    report["paths"]["stage2_checkpoint"] = summary["checkpoint"]

    evaluated = work / "eval"
    stages["evaluate"] = run_stage("evaluate", [
        py, jobs / "evaluate.py", f"eval.checkpoint={summary['checkpoint']}", "eval.benchmarks=[processbench]",
        f"eval.limit={s['eval_limit']}", "pipeline.score_batch_size=4", f"eval.out={evaluated}"], work, timeout)
    stages["evaluate"]["summary"] = json.loads((evaluated / "metrics.json").read_text())
    report["paths"]["eval"] = str(evaluated)
    report["total_s"] = round(sum(v["wall_s"] for v in stages.values()), 1)
    return report


def timings(report: dict) -> dict:
    """The JSON kept in benchmarks/results: wall time per stage and the counts each stage worked on."""
    st = report["stages"]
    rows = {
        "generate": f"{st['generate']['summary']['problems']} problems -> {st['generate']['summary']['rows']} rollouts, "
                    f"{st['generate']['summary']['generated_tokens']} policy tokens",
        "filter": f"{st['filter']['summary']['scored']} scored, {st['filter']['summary']['retained']} retained",
        "label": f"{st['label']['summary']['rows']} rows, status {st['label']['summary']['status']}, "
                 f"{st['label']['summary']['judge_generated_tokens']} judge tokens",
        "train": f"{st['train']['summary']['outcomes']['trained']} rows, {st['train']['summary']['optimizer_steps']} steps",
        "evaluate": f"{sum(v['n'] for v in st['evaluate']['summary']['benchmarks']['processbench']['subsets'].values())}"
                    " ProcessBench rows",
    }
    if "active_train" in st:
        a = st["active_train"]["summary"]
        rows["active_train"] = f"{a['rows_read']} rows, outcomes {a['outcomes']}, {a['labels_used']} labels"
    return {
        "what": "wall seconds per job of the real-model path (SmolLM2-135M-Instruct as policy, judge and PRM "
                "backbone), each job in its own process with its own local Ray instance: imports, Ray start, vLLM "
                "engine start (enforce_eager) and model loads included",
        "size": report["size"], "settings": report["settings"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_at_end": [round(x, 1) for x in os.getloadavg()]},
        "stages": {k: {"wall_s": v["wall_s"], "work": rows[k]} for k, v in st.items()},
        "total_s": report["total_s"],
        "processbench_mean_f1": st["evaluate"]["summary"]["benchmarks"]["processbench"]["mean_f1"],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="extended")
    p.add_argument("--work", default=None, help="working folder (default: a new temporary one)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "real_path_cpu.json"))
    args = p.parse_args(argv)
    import tempfile

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="real_path-"))
    report = run_path(work, args.size)
    result = timings(report)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["stages"], indent=2))
    print(f"[real_path] total {result['total_s']} s; work: {work}; timings: {args.out}")
    return result


if __name__ == "__main__":
    main()
