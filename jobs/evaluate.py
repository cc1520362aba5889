"""Evaluate a PRM checkpoint on ProcessBench, PRMBench or another first-error set (METHOD §9).

    python jobs/evaluate.py            # embedded default: a tiny EnsemblePRM on a 20-row ProcessBench slice
    python jobs/evaluate.py eval.checkpoint=DIR eval.benchmarks=[processbench,prmbench] eval.out=runs/eval
    python jobs/evaluate.py eval.checkpoint=DIR eval.benchmarks=[first_error] eval.format=big_bench_mistake
    python jobs/evaluate.py --config conf/eval_7b.yaml eval.checkpoint=DIR     # 8 GPU scorer actors

The command line of every job: [--config FILE] [a.b=c ...], the eval.* keys and pipeline.score_* (docs/CONFIG.md).
Writes predictions.jsonl, metrics.json, report.md, PNG plots and the resolved config.yaml into eval.out and prints
where they are. The checkpoint may be an EnsemblePRM directory, a Qwen2.5-Math-PRM-style directory, or "tiny" /
"tiny_qwen_prm" (offline test models built on the fly).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from actprm_ray.config import Config, run_directory, save_resolved  # noqa: E402
from actprm_ray.drivers.run import job_parser, parse_job_args  # noqa: E402
from actprm_ray.eval.report import write_outputs  # noqa: E402
from actprm_ray.eval.runner import run_benchmark  # noqa: E402
from actprm_ray.eval.scorers import TINY_SPECS, build_local_scorer, build_tiny_checkpoint  # noqa: E402

SMOKE_LIMIT = 20  # rows per subset of the smoke run (eval.checkpoint=""), so the no-argument run stays short


def resolve(cfg: Config) -> Config:
    """Fill the keys whose default depends on others or on the clock, so config.yaml records what ran."""
    e = cfg.eval
    if not e.checkpoint:
        e.checkpoint = "tiny"
        e.limit = SMOKE_LIMIT if e.limit is None else e.limit
    if not e.out:
        e.out = str(run_directory(cfg) / f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
    return cfg


def build_scorer(cfg: Config, checkpoint: Path):
    e, p = cfg.eval, cfg.pipeline
    if e.scorer == "ray":
        from actprm_ray.eval.ray_scorer import RayDataScorer

        return RayDataScorer(checkpoint, batch_size=p.score_batch_size, actors=p.score_actors,
                             num_gpus=p.score_num_gpus, num_cpus=p.score_num_cpus,
                             dtype="bfloat16" if p.score_num_gpus else "float32", system_prompt=e.system_prompt)
    return build_local_scorer(checkpoint, kind=e.kind, device=e.device, system_prompt=e.system_prompt)


def parse_args(argv: list[str]) -> Config:
    """--config FILE and a.b=c overrides (eval.*, pipeline.score_*): the command line of every job."""
    return parse_job_args(job_parser("jobs/evaluate.py", __doc__), argv)[1]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = resolve(parse_args(sys.argv[1:] if argv is None else argv))
    e = cfg.eval
    print(f"[actprm] config: {save_resolved(cfg, e.out)}")
    with tempfile.TemporaryDirectory(prefix="actprm-eval-") as tmp:
        checkpoint = build_tiny_checkpoint(e.checkpoint, tmp) if e.checkpoint in TINY_SPECS else Path(e.checkpoint)
        scorer = build_scorer(cfg, checkpoint)
        results = {}
        for bench in e.benchmarks:
            res = run_benchmark(bench, scorer, data=e.data, fmt=e.format, limit=e.limit,
                                batch_size=cfg.pipeline.score_batch_size, tau=e.tau, sweep_on=e.sweep_on,
                                max_tokens=e.max_tokens or None)
            results[res.benchmark] = res
    meta = {"checkpoint": e.checkpoint, "checkpoint_name": Path(e.checkpoint).name, "tau": e.tau, "limit": e.limit,
            "batch_size": cfg.pipeline.score_batch_size, "argv": argv, **scorer.describe()}
    paths = write_outputs(results, e.out, meta)
    for name, res in results.items():
        headline = res.metrics["overall"]["prm_score"] if name == "prmbench" else res.metrics["mean_f1"]
        print(f"[actprm] {name}: {'PRMScore' if name == 'prmbench' else 'mean F1'} {headline:.4f}")
    print(f"[actprm] predictions: {paths['predictions']}")
    print(f"[actprm] metrics:     {paths['metrics']}")
    print(f"[actprm] report:      {paths['report']}")
    print(f"[actprm] plots:       {', '.join(str(p) for p in paths['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
