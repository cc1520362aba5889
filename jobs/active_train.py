"""Online active learning: stream the pool, score it with the PRM being trained, label only the uncertain
rows, train on them. With no arguments: the embedded default (local Ray, tiny model, synthetic pool, oracle).

    python jobs/active_train.py [--config conf/X.yaml] [--dry_run] [a.b=c ...]
    ray job submit --working-dir . -- python jobs/active_train.py --config conf/default.yaml

--dry_run prints the plan, the trainer's ScalingConfig and per-GPU memory estimates for the trainer, the scorer
and the vLLM judge, without starting Ray or loading weights, and exits 1 when the profile does not fit the
hardware it names (cluster.gpu_memory_gb, cluster.num_gpus).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from actprm_ray.config import DEFAULT_CONFIG, Config  # noqa: E402
from actprm_ray.drivers.active import run_active  # noqa: E402
from actprm_ray.drivers.run import job_parser, parse_job_args  # noqa: E402
from actprm_ray.drivers.run_report import verdict  # noqa: E402


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Config]:
    """--dry_run, then --config (default conf/default.yaml) and a.b=c overrides."""
    p = job_parser("jobs/active_train.py", __doc__)
    p.add_argument("--dry_run", action="store_true",
                   help="print the plan, the ScalingConfig and memory estimates; start no Ray, load no weights")
    return parse_job_args(p, argv, default_config=DEFAULT_CONFIG)


def main() -> None:
    known, cfg = parse_args(sys.argv[1:])
    if known.dry_run:
        from actprm_ray.drivers.dry_run import dry_run

        raise SystemExit(dry_run(cfg, known.config))
    summary = run_active(cfg)
    keys = ("rows_read", "outcomes", "labels_used", "trust_pct", "pseudo_label_accuracy", "model_versions_published",
            "lag_histogram", "wall_time_s", "checkpoint")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    print(f"[actprm] summary: {summary['run_dir']}/summary.json  outcomes: {summary['run_dir']}/outcomes.parquet")
    print(f"[actprm] {verdict(summary)}\n[actprm] report: {summary['report']}")


if __name__ == "__main__":
    main()
