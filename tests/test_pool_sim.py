"""benchmarks/pool_sim.py: the interval and budget helpers on hand-worked cases, and one tiny run per mode."""

from __future__ import annotations

import math

import pytest
from script_loader import load_script

ps = load_script("benchmarks/pool_sim.py")


def test_t_interval_uses_the_student_t_quantile():
    m, lo, hi = ps.t_interval([1.0, 2.0, 3.0])  # sd 1, n 3: half-width 4.303 / sqrt(3)
    assert m == 2.0 and math.isclose(hi - m, 4.303 / math.sqrt(3)) and math.isclose(m - lo, hi - m)
    assert math.isnan(ps.t_interval([0.5])[1])


def test_f1_at_and_labels_to_reach_are_step_functions():
    pts = [{"labels": 0, "test": 0.0}, {"labels": 500, "test": 0.6}, {"labels": 1000, "test": 0.5}]
    assert ps.f1_at(pts, 499, "test") == 0.0 and ps.f1_at(pts, 900, "test") == 0.6 and ps.f1_at(pts, 5000, "test") == 0.5
    assert ps.labels_to_reach(pts, 0.55, "test") == 500 and ps.labels_to_reach(pts, 0.7, "test") is None


@pytest.mark.parametrize("mode,replay", [("all", 0), ("active", 0), ("random", 0), ("all", 2)])
def test_one_tiny_run_counts_labels_and_trust(tiny_backbone_dir, mode, replay):
    from actprm_ray.config import DEFAULT_CONFIG, load_config
    from actprm_ray.data.synthetic import MIXES, generate_pool

    cfg = load_config(DEFAULT_CONFIG, ["model.n_heads=2", "train.micro_batch_size=4", "train.total_steps=8",
                                       "train.warmup_steps=1", f"selection.mode={mode}", "selection.random_rate=0.5",
                                       f"train.replay={replay}"])
    pool = generate_pool(24, seed=3, mix=MIXES["addsub"])
    out = ps.simulate(cfg, str(tiny_backbone_dir), pool, {"val": generate_pool(8, seed=4, mix=MIXES["addsub"])},
                      eval_every=8, log=lambda line: None)
    labels = out["final"]["labels"]
    assert [p["labels"] for p in out["points"]] == sorted(p["labels"] for p in out["points"])
    assert out["points"][-1]["labels"] == labels and 0.0 <= out["final"]["val"] <= 1.0
    # trained in full micro-batches only, each new one followed by `replay` drawn from the labelled rows
    assert out["final"]["steps"] == labels // 4 * (1 + replay)
    if mode == "all":
        assert labels == 24 and out["trusted"] == 0
    elif mode == "active":
        assert labels + out["trusted"] == 24  # every row scored: labelled or trusted
    else:
        assert 0 < labels < 24 and out["trusted"] == 0


def test_controller_run_holds_its_rate_and_audits_trusted_rows(tiny_backbone_dir):
    from actprm_ray.config import DEFAULT_CONFIG, load_config
    from actprm_ray.data.synthetic import MIXES, generate_pool

    cfg = load_config(DEFAULT_CONFIG, ["model.n_heads=2", "train.micro_batch_size=4", "train.total_steps=50",
                                       "train.warmup_steps=1", "selection.mode=active", "selection.target_rate=0.25",
                                       "selection.audit_rate=0.2", "selection.controller_window=32",
                                       "selection.accuracy_floor=0.0"])  # an untrained model would trip the guard
    pool = generate_pool(160, seed=3, mix=MIXES["addsub"])
    out = ps.simulate(cfg, str(tiny_backbone_dir), pool, {"val": generate_pool(8, seed=4, mix=MIXES["addsub"])},
                      eval_every=40, log=lambda line: None)
    # The untrained model is uncertain about everything (fixed thresholds label ~all); the controller holds 25%
    # within a few rows of catch-up, audits included (they are labels too).
    assert out["controller"]["labelled"] == out["final"]["labels"]
    assert out["final"]["labels"] + out["trusted"] == 160
    assert 0.15 <= out["label_rate"] <= 0.35, out["label_rate"]
    assert out["audited"] > 0 and 0.0 <= out["audited_accuracy"] <= 1.0
