"""Policy rollouts: problems JSONL -> a folder of rollout shards in the pool-row schema (METHOD §8), on Ray.

Run on a laptop (embedded default: a random tiny policy, 16 GSM8K problems, CPU):
    python jobs/generate.py
    python jobs/generate.py generate.limit=4 generate.out_dir=runs/generate/rollouts
A real policy on a GPU, or SmolLM2 on CPU:
    python jobs/generate.py --config conf/generate_7b.yaml generate.out_dir=/mnt/shared/actprm/pool/gsm8k
    python jobs/generate.py --config conf/real_small.yaml

The command line of every job: [--config FILE] [a.b=c ...], the generate.* keys and model.system_prompt
(docs/CONFIG.md). Writes generate.out_dir: shard-NNNNN.parquet per shard of generate.shard_size problems (the
folder is a pool: data.pool=<out_dir>), their completion records in _shards/, _summary.json and the resolved
_config.yaml. Run it again after an interruption: finished shards are skipped (actprm_ray/generate/shards.py).
The vLLM engines run in Ray actors (actprm_ray/generate/processor.py); this process needs no GPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from actprm_ray.config import Config, ConfigError  # noqa: E402
from actprm_ray.drivers.run import job_parser, parse_job_args  # noqa: E402
from actprm_ray.generate.job import GenerateError, run_generate  # noqa: E402
from actprm_ray.generate.rollouts import ProblemsError  # noqa: E402
from actprm_ray.generate.shards import ShardMismatch  # noqa: E402

# A user's mistake (config, problems file, output folder, cluster size): its message, without a traceback.
USER_ERRORS = (ConfigError, ProblemsError, ShardMismatch, GenerateError)


def parse_args(argv: list[str]) -> Config:
    """--config FILE and a.b=c overrides (generate.*, model.system_prompt): the command line of every job."""
    return parse_job_args(job_parser("jobs/generate.py", __doc__), argv)[1]


def main(argv: list[str]) -> dict:
    try:
        summary = run_generate(parse_args(argv))
    except USER_ERRORS as e:
        raise SystemExit(f"generate: error: {e}") from None
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
