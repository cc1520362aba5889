"""Policy rollouts: problems JSONL -> trajectories Parquet in the pool-row schema (METHOD §8).

Run on a laptop (tiny random policy, 16 GSM8K problems, CPU):
    python jobs/generate.py
A real policy on a GPU (any RolloutConfig field as key=value, or a YAML file with --config):
    python jobs/generate.py model=Qwen/Qwen2.5-Math-7B-Instruct policy_id=qwen2.5-math-7b-instruct \
        dtype=bfloat16 enforce_eager=false max_model_len=null max_tokens=8192 limit=null out_path=runs/gsm8k.parquet
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actprm_ray.label.rollouts import RolloutConfig, generate_rollouts, load_problems, write_pool_parquet  # noqa: E402

SHARED_DATA = Path(os.environ.get("ACTPRM_SHARED_DATA", REPO / ".." / "shared" / "data"))
# Laptop defaults: "tiny" = a random tiny policy built next to the output, CPU-sized context and lengths.
LAPTOP = dict(model="tiny", policy_id="tiny-random", problems_path=str(SHARED_DATA / "problems/gsm8k/train.jsonl"),
              out_path="runs/generate/rollouts.parquet", limit=16, dtype="float32", max_model_len=1024,
              max_tokens=256, enforce_eager=True)


def parse_config(argv: list[str]) -> RolloutConfig:
    cfg = OmegaConf.merge(OmegaConf.structured(RolloutConfig), LAPTOP)
    if argv[:1] == ["--config"]:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(argv[1]))
        argv = argv[2:]
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(argv))  # unknown keys / wrong types raise here
    return OmegaConf.to_object(cfg)


def main(argv: list[str]) -> dict:
    config = parse_config(argv)
    if config.model == "tiny":
        from actprm_ray.model.tiny import build_tiny_backbone

        config.model = str(build_tiny_backbone(Path(config.out_path).parent / "tiny_policy"))
    problems = load_problems(config.problems_path, config.limit)
    t0 = time.time()
    rows, stats = generate_rollouts(config, problems)
    write_pool_parquet(rows, config.out_path)
    stats.update(seconds=round(time.time() - t0, 2), out_path=config.out_path)
    Path(config.out_path + ".summary.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    main(sys.argv[1:])
