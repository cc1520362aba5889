"""Golden loss curve (torchtune style): the tiny model's first 20 optimizer steps of one fixed run, recorded once
and asserted to 1e-4, so that a refactor provably changes no training behaviour.

The run is the streaming trainer's path without Ray, every piece the one the loop uses: conf/default.yaml
(load_config) with the recipe it had when recorded (RECORDED_RECIPE), the tiny random-init backbone
(build_tiny_backbone, seeded by run.seed) with fresh EnsemblePRM heads
saved and reloaded as the loop's version-0 checkpoint, the synthetic pool (data.synthetic_seed), CanonicalizeStage
on that checkpoint's tokenizer, OracleLabeler, and train/step.py (build_optimizer, micro_step, optimizer_step).
Scoring and selection are left out: they decide which rows reach the trainer, not what a step does with them, so
every valid row is selected (as mode=all would).

Re-record with

    .venv/bin/python tests/test_golden_loss.py --record

Re-recording is legitimate only when a behaviour change is intended; name that change in the commit that
updates tests/golden/tiny_loss_curve.json. A refactor that needs a new recording is not a refactor.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny_loss_curve.json"
STEPS = 20
TOLERANCE = 1e-4
# conf/default.yaml's model and optimiser settings when the curve was recorded; pinned here, since the embedded
# default has since moved to the pretrained backbone's recipe (a config change, not a change of what a step does).
RECORDED_RECIPE = ["model.n_heads=32", "train.lr=1e-3", "train.head_lr=null", "train.warmup_steps=20",
                   "train.total_steps=300"]


def golden_run(workdir: Path, steps: int = STEPS, overrides: list[str] | None = None) -> dict:
    """Train `steps` optimizer steps of the fixed run in `workdir`; return the per-step loss, grad norm and lr."""
    from actprm_ray.config import DEFAULT_CONFIG, load_config
    from actprm_ray.data.synthetic import generate_pool
    from actprm_ray.label.base import OracleLabeler
    from actprm_ray.model.ensemble_prm import EnsemblePRM, PRMConfig
    from actprm_ray.model.tiny import build_tiny_backbone
    from actprm_ray.pipeline.stages import CanonicalizeStage
    from actprm_ray.train.step import build_optimizer, micro_step, optimizer_step

    # One thread: a multi-threaded CPU reduction may sum in a different order from run to run.
    torch.set_num_threads(1)
    cfg = load_config(DEFAULT_CONFIG, RECORDED_RECIPE + (overrides or []))
    m, t = cfg.model, cfg.train
    backbone = build_tiny_backbone(workdir / "backbone", size="tiny", seed=cfg.run.seed)
    init_dir = EnsemblePRM.from_backbone(backbone, PRMConfig.from_config(cfg)).save_pretrained(workdir / "init")
    model = EnsemblePRM.from_pretrained(init_dir, dtype=getattr(torch, m.dtype),
                                        attn_implementation=m.attn_implementation)
    optimizer, scheduler = build_optimizer(model, model, t)

    canonicalize = CanonicalizeStage(str(init_dir), sep=m.sep, system_prompt=m.system_prompt, max_length=m.max_length)
    labeler = OracleLabeler()
    need = steps * t.micro_batch_size * t.grad_accum
    pool = generate_pool(2 * need, seed=cfg.data.synthetic_seed)  # twice the need: room for rows that fail
    trainable: list[dict] = []
    for start in range(0, len(pool), t.micro_batch_size):
        chunk = pool[start:start + t.micro_batch_size]
        batch = canonicalize({k: np.asarray([r[k] for r in chunk], dtype=object)
                              for k in ("id", "question", "steps", "first_error_step")})
        batch = labeler({**batch, "selected": batch["valid"]})
        trainable += [{k: batch[k][i] for k in batch} for i in range(len(chunk)) if batch["label_status"][i] == "ok"]
    assert len(trainable) >= need, f"only {len(trainable)} of the {need} rows the run needs are trainable"

    curve: dict[str, list[float]] = {"loss": [], "grad_norm": [], "lr": []}
    rows = iter(trainable[i:i + t.micro_batch_size] for i in range(0, need, t.micro_batch_size))
    for _ in range(steps):
        losses = [micro_step(model, model, next(rows), cfg, loss_scale=1 / t.grad_accum).loss
                  for _ in range(t.grad_accum)]
        curve["lr"].append(scheduler.get_last_lr()[0])  # the lr this step applies
        curve["grad_norm"].append(optimizer_step(model, optimizer, scheduler, t.grad_clip))
        curve["loss"].append(losses[-1])  # what the trainer reports as the step's loss
    return curve


def test_loss_curve_matches_the_recording(tmp_path):
    recorded = json.loads(GOLDEN.read_text())
    curve = golden_run(tmp_path, steps=len(recorded["loss"]))
    for key in ("loss", "grad_norm", "lr"):
        diffs = [abs(a - b) for a, b in zip(curve[key], recorded[key])]
        worst = max(range(len(diffs)), key=diffs.__getitem__)
        assert diffs[worst] <= TOLERANCE * max(1.0, abs(recorded[key][worst])), (
            f"{key} at step {worst + 1}: {curve[key][worst]!r} != recorded {recorded[key][worst]!r}; "
            f"got {curve[key]}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory() as d:
        curve = golden_run(Path(d))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"steps": STEPS, "config": ["conf/default.yaml", *RECORDED_RECIPE], **curve}, indent=1) + "\n")
    print(f"wrote {GOLDEN}: loss {curve['loss'][0]:.6f} -> {curve['loss'][-1]:.6f}")
