"""Judge a selected set offline into labelled training rows (cache-backed; a rerun pays nothing twice).

    python jobs/label.py --input runs/filter/retained/ --output runs/labels labeler.kind=vllm \
        labeler.judge.model=/models/QwQ-32B labeler.judge.judge_id=qwq-32b
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from actprm_ray.drivers.label_job import parse_label_args, run_label  # noqa: E402


def main() -> None:
    args, cfg = parse_label_args(sys.argv[1:])
    summary = run_label(cfg, args)
    print(json.dumps({k: v for k, v in summary.items() if k != "budget"}, indent=2))
    print(f"[label] labelled rows: {summary['output']}/labelled/  summary: {summary['output']}/label_summary.json")


if __name__ == "__main__":
    main()
