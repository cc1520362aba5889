"""Evaluate a PRM checkpoint on ProcessBench, PRMBench or another first-error set (METHOD §9).

    python jobs/evaluate.py --checkpoint DIR --benchmark processbench prmbench --out runs/eval
    python jobs/evaluate.py --checkpoint DIR --benchmark first_error --format big_bench_mistake
    python jobs/evaluate.py            # embedded default: a tiny EnsemblePRM on a 20-row ProcessBench slice

Writes predictions.jsonl, metrics.json, report.md and PNG plots into --out and prints where they are.
The checkpoint may be an EnsemblePRM directory, a Qwen2.5-Math-PRM-style directory, or "tiny" /
"tiny_qwen_prm" (offline test models built on the fly).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from actprm_ray.eval.first_error import FORMATS  # noqa: E402
from actprm_ray.eval.report import write_outputs  # noqa: E402
from actprm_ray.eval.runner import BENCHMARKS, MAX_EVAL_TOKENS, run_benchmark  # noqa: E402
from actprm_ray.eval.scorers import TINY_SPECS, build_local_scorer, build_tiny_checkpoint  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """All argument handling lives here, so switching to the shared OmegaConf config touches one function."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help=f"checkpoint directory, or one of {TINY_SPECS} "
                   "(default: tiny, with --limit 20 unless given)")
    p.add_argument("--kind", default="auto", choices=["auto", "ensemble", "qwen_prm"], help="checkpoint kind (default: detect)")
    p.add_argument("--benchmark", nargs="+", default=["processbench"], choices=BENCHMARKS,
                   help="one or more of processbench, prmbench, first_error (default: processbench)")
    p.add_argument("--format", default=None, choices=sorted(FORMATS), help="dataset format for --benchmark first_error")
    p.add_argument("--data", default=None, help="data path (only with a single --benchmark; default: ../shared/data/...)")
    p.add_argument("--limit", type=int, default=None, help="N samples per subset/category, spread over the file "
                   "(first-error sets keep correct/erroneous rows in proportion; default: all)")
    p.add_argument("--out", default=None, help="output directory (default: runs/eval-<time>)")
    p.add_argument("--batch_size", type=int, default=16, help="rows per forward pass (rows are length-sorted first)")
    p.add_argument("--max_tokens", type=int, default=MAX_EVAL_TOKENS,
                   help=f"rows longer than this many tokens are reported unscorable, never truncated; 0 = no cap "
                        f"(default: {MAX_EVAL_TOKENS})")
    p.add_argument("--tau", type=float, default=0.5, help="first-error threshold τ (recorded; PRMBench always uses µ > 0.5)")
    p.add_argument("--sweep_on", default=None, help="subset to fit a τ sweep on (reported apart from the τ headline)")
    p.add_argument("--device", default=None, help="torch device for --scorer local (default: cuda if available, else cpu)")
    p.add_argument("--scorer", default="local", choices=["local", "ray"],
                   help="local: in this process; ray: the loop's Ray Data stages (EnsemblePRM only; parallel on a cluster)")
    p.add_argument("--actors", type=int, default=1, help="--scorer ray: max ScoreStage actors")
    p.add_argument("--num_gpus", type=float, default=0.0, help="--scorer ray: GPUs per ScoreStage actor (bf16 when > 0)")
    p.add_argument("--system_prompt", default=None, help="override the checkpoint's system prompt")
    args = p.parse_args(argv)
    if args.data is not None and len(args.benchmark) > 1:
        p.error("--data applies to one benchmark; run them separately to point each at its own data")
    if "first_error" in args.benchmark and args.format is None:
        p.error(f"--benchmark first_error needs --format, one of {sorted(FORMATS)}")
    if args.sweep_on and args.benchmark == ["prmbench"]:
        p.error("--sweep_on applies to the first-error protocol (processbench, first_error), not prmbench")
    if args.batch_size < 1:
        p.error("--batch_size must be >= 1")
    if args.max_tokens < 0:
        p.error("--max_tokens must be >= 0 (0 = no cap)")
    if args.checkpoint is None:
        args.checkpoint = "tiny"
        if args.limit is None:
            args.limit = 20  # the no-argument smoke run stays short
    if args.out is None:
        args.out = str(Path("runs") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
    return args


def _build_scorer(args: argparse.Namespace, checkpoint: Path):
    if args.scorer == "ray":
        from actprm_ray.eval.ray_scorer import RayDataScorer

        return RayDataScorer(checkpoint, batch_size=args.batch_size, actors=args.actors, num_gpus=args.num_gpus,
                             dtype="bfloat16" if args.num_gpus else "float32", system_prompt=args.system_prompt)
    return build_local_scorer(checkpoint, kind=args.kind, device=args.device, system_prompt=args.system_prompt)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="actprm-eval-") as tmp:
        checkpoint = build_tiny_checkpoint(args.checkpoint, tmp) if args.checkpoint in TINY_SPECS else Path(args.checkpoint)
        scorer = _build_scorer(args, checkpoint)
        results = {}
        for bench in args.benchmark:
            res = run_benchmark(bench, scorer, data=args.data, fmt=args.format, limit=args.limit,
                                batch_size=args.batch_size, tau=args.tau, sweep_on=args.sweep_on,
                                max_tokens=args.max_tokens or None)
            results[res.benchmark] = res
    meta = {"checkpoint": str(args.checkpoint), "checkpoint_name": Path(str(args.checkpoint)).name,
            "tau": args.tau, "limit": args.limit, "batch_size": args.batch_size, "argv": sys.argv[1:] if argv is None else argv,
            **scorer.describe()}
    paths = write_outputs(results, args.out, meta)
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
