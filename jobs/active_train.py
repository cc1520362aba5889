"""Online active learning: stream the pool, score it with the PRM being trained, label only the uncertain
rows, train on them. With no arguments: the embedded default (local Ray, tiny model, synthetic pool, oracle).

    python jobs/active_train.py [--config conf/X.yaml] [--dry_run] [a.b=c ...]
    ray job submit --working-dir . -- python jobs/active_train.py --config conf/default.yaml

--dry_run prints the plan, the trainer's ScalingConfig and per-GPU memory estimates for the trainer, the scorer
and the vLLM judge, without starting Ray or loading weights, and exits 1 when the profile does not fit the
hardware it names (cluster.gpu_memory_gb, cluster.num_gpus).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from actprm_ray.config import parse_args  # noqa: E402
from actprm_ray.drivers.active import run_active  # noqa: E402
from actprm_ray.drivers.run_report import verdict  # noqa: E402


def main() -> None:
    argv = sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)  # then parse_args prints the config usage and exits
    if "--dry_run" in argv:
        from actprm_ray.drivers.dry_run import dry_run

        argv.remove("--dry_run")
        config_path = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
        raise SystemExit(dry_run(parse_args(argv), config_path))
    summary = run_active(parse_args(argv))
    keys = ("rows_read", "outcomes", "labels_used", "trust_pct", "pseudo_label_accuracy", "model_versions_published",
            "lag_histogram", "wall_time_s", "checkpoint")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    print(f"[actprm] summary: {summary['run_dir']}/summary.json  outcomes: {summary['run_dir']}/outcomes.parquet")
    print(f"[actprm] {verdict(summary)}\n[actprm] report: {summary['report']}")


if __name__ == "__main__":
    main()
