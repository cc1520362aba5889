"""Pretrain the tiny backbone as a causal LM on unlabeled correct synthetic solutions (no step labels).

    python jobs/pretrain.py                                   # ~/.cache/actprm_ray/models/tiny_math: ~6-9 min on 2 cores
    python jobs/pretrain.py out_dir=runs/backbones/tiny_math  # the directory docs/RESULTS.md's commands name
    python jobs/pretrain.py rows=2048 out_dir=/tmp/tiny_math  # a small one (CI size), ~20 s
    python jobs/active_train.py model.backbone=tiny-math      # the default's backbone: this job's default output

Any PretrainConfig field as key=value. The directory is reused when its pretrain.json holds the same config,
so rerunning is free. It prints the held-out LM metrics before and after (loss, next-token accuracy, accuracy
on the digits of step results).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actprm_ray.model.pretrain import PretrainConfig, pretrain_backbone  # noqa: E402


def main(argv: list[str]) -> dict:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        print(OmegaConf.to_yaml(OmegaConf.structured(PretrainConfig)))
        return {}
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PretrainConfig), OmegaConf.from_dotlist(argv)))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = pretrain_backbone(cfg)
    record = json.loads((out / "pretrain.json").read_text())
    summary = dict(backbone=str(out), seconds=record["seconds"], before=record["heldout_before"],
                   after=record["heldout_after"])
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
