"""Supervised (continued) training on a labelled set: stage 2 from a stage-1 checkpoint, or from a fresh backbone.
Same loss, trainer and checkpoints as jobs/active_train.py. With no arguments: the synthetic pool with its own
labels, fresh heads on the tiny backbone (the embedded default).

    python jobs/train.py --init_checkpoint runs/stage1/ray_train/stage1/checkpoint_X data.pool=labelled.parquet run.name=stage2
    ray job submit --working-dir . -- python jobs/train.py --config conf/X.yaml --init_checkpoint s3://... data.pool=...
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from actprm_ray.drivers.supervised import parse_train_args, run_supervised  # noqa: E402


def main() -> None:
    init_checkpoint, cfg = parse_train_args(sys.argv[1:])
    summary = run_supervised(cfg, init_checkpoint)
    keys = ("rows_read", "outcomes", "failure_reasons", "optimizer_steps", "final_loss", "wall_time_s", "checkpoint")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    print(f"[train] summary: {summary['run_dir']}/summary.json")


if __name__ == "__main__":
    main()
