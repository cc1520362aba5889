"""Policy rollouts: problems JSONL -> trajectories Parquet in the pool-row schema (METHOD §8).

Run on a laptop (embedded default: a random tiny policy, 16 GSM8K problems, CPU):
    python jobs/generate.py
    python jobs/generate.py generate.limit=4 generate.out_path=runs/generate/rollouts.parquet
A real policy on a GPU, or SmolLM2 on CPU:
    python jobs/generate.py --config conf/generate_7b.yaml generate.out_path=/mnt/shared/actprm/pool/gsm8k.parquet
    python jobs/generate.py --config conf/real_small.yaml

The command line of every job: [--config FILE] [a.b=c ...], the generate.* keys and model.system_prompt
(docs/CONFIG.md). Writes generate.out_path, with <out_path>.summary.json and the resolved <out_path>.config.yaml.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from actprm_ray.config import Config, parse_args, run_directory, to_yaml  # noqa: E402
from actprm_ray.eval.samples import shared_data_dir  # noqa: E402
from actprm_ray.label.rollouts import generate_rollouts, load_problems, write_pool_parquet  # noqa: E402


def resolve(cfg: Config) -> Config:
    """Fill the paths whose default depends on the run directory or the data folder, so the saved config is what ran."""
    g = cfg.generate
    g.out_path = g.out_path or str(run_directory(cfg) / "rollouts.parquet")
    g.problems_path = g.problems_path or str(shared_data_dir() / "problems" / "gsm8k" / "train.jsonl")
    if g.model == "tiny":
        from actprm_ray.model.tiny import build_tiny_backbone

        g.model = str(build_tiny_backbone(Path(g.out_path).parent / "tiny_policy"))
    return cfg


def main(argv: list[str]) -> dict:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)  # then parse_args prints the config usage and exits
    cfg = resolve(parse_args(argv, default_config=None))
    g = cfg.generate
    Path(g.out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(g.out_path + ".config.yaml").write_text(to_yaml(cfg))
    problems = load_problems(g.problems_path, g.limit)
    t0 = time.time()
    rows, stats = generate_rollouts(g, problems, cfg.model.system_prompt)
    write_pool_parquet(rows, g.out_path)
    stats.update(seconds=round(time.time() - t0, 2), out_path=g.out_path)
    Path(g.out_path + ".summary.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    main(sys.argv[1:])
