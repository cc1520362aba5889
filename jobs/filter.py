"""One-shot filtering of a large trajectory set with a fixed checkpoint (stage 2): score every row once, keep
the uncertain ones for labelling. Resumable: rerun with the same --output after a crash or kill.

    python jobs/filter.py --checkpoint CKPT --input pool/ --output filtered/ [--write_all] [selection.delta_pred=0.9 ...]
    ray job submit --working-dir . -- python jobs/filter.py --checkpoint s3://b/ckpt --input s3://b/pool --output s3://b/out
With no arguments: fresh heads on the tiny backbone over the synthetic pool (the embedded default).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from actprm_ray.drivers.filter import parse_filter_args, run_filter  # noqa: E402


def main() -> None:
    args, cfg = parse_filter_args(sys.argv[1:])
    summary = run_filter(cfg, args)
    keys = ("read", "scored", "retained", "discarded", "invalid", "retained_fraction", "invalid_reasons",
            "shards", "shards_skipped", "wall_time_s", "rows_per_s_this_run")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    print(f"[filter] retained rows: {summary['output']}/retained/  summary: {summary['output']}/filter_summary.json")


if __name__ == "__main__":
    main()
