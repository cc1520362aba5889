"""Online active learning: stream the pool, score it with the PRM being trained, label only the uncertain
rows, train on them. With no arguments: the embedded default (local Ray, tiny model, synthetic pool, oracle).

    python jobs/active_train.py [--config conf/X.yaml] [a.b=c ...]
    ray job submit --working-dir . -- python jobs/active_train.py --config conf/default.yaml
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from actprm_ray.config import parse_args  # noqa: E402
from actprm_ray.pipeline.active import run_active  # noqa: E402


def main() -> None:
    summary = run_active(parse_args())
    keys = ("rows_read", "outcomes", "labels_used", "trust_pct", "pseudo_label_accuracy", "model_versions_published",
            "lag_histogram", "wall_time_s", "checkpoint")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    print(f"[actprm] summary: {summary['run_dir']}/summary.json  outcomes: {summary['run_dir']}/outcomes.parquet")


if __name__ == "__main__":
    main()
