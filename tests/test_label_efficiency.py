"""benchmarks/label_efficiency.py: pure helpers on hand-worked cases, and a --quick smoke run (structure only).

The smoke run does not assert the label-efficiency effect (issue 7): only that the outputs exist, the numbers
are finite, and the budgets / labels-used are monotone.
"""

from __future__ import annotations

import json
import math

import pytest
from script_loader import load_script

le = load_script("benchmarks/label_efficiency.py")

POINTS = [{"labels": 0, "f1": 0.1}, {"labels": 40, "f1": 0.5}, {"labels": 80, "f1": 0.4}, {"labels": 120, "f1": 0.7}]


def test_f1_at_budget_is_a_step_function():
    assert le.f1_at_budget(POINTS, 0) == 0.1
    assert le.f1_at_budget(POINTS, 39) == 0.1  # the 40-label checkpoint is not reached yet
    assert le.f1_at_budget(POINTS, 40) == 0.5
    assert le.f1_at_budget(POINTS, 100) == 0.4  # the last checkpoint within budget, not the best one
    assert le.f1_at_budget([{"labels": 10, "f1": 0.3}], 5) is None


def test_labels_to_reach_takes_the_first_crossing():
    assert le.labels_to_reach(POINTS, 0.45) == 40
    assert le.labels_to_reach(POINTS, 0.6) == 120
    assert le.labels_to_reach(POINTS, 0.71) is None


def test_headline_pairs_runs_by_seed():
    """Hand-worked: seed 1's active run beats random by 0.2 at 50% labels, seed 0's by 0.0; active reaches each
    seed's own full-data final F1 (0.7, 0.6) at 120 and 80 labels."""
    def run(arm, seed, points, labels):
        return {"run": {"arm": arm, "seed": seed, "labels_used": labels}, "points": points}

    plan = le.Plan(pool_rows=160, test_rows=10, seeds=[0, 1], arms=[], n_heads=2, budget_fracs=[0.25])
    active = [run("active", 0, POINTS, 120), run("active", 1, [{"labels": 0, "f1": 0.0}, {"labels": 80, "f1": 0.6}], 80)]
    random_ = [run("random", 1, [{"labels": 0, "f1": 0.0}, {"labels": 80, "f1": 0.4}], 80),
               run("random", 0, [{"labels": 0, "f1": 0.1}, {"labels": 80, "f1": 0.4}], 80)]
    full = [run("all", 0, [{"labels": 160, "f1": 0.7}], 160), run("all", 1, [{"labels": 160, "f1": 0.6}], 160)]
    head = le.headline(plan, {"active": active, "random": random_, "all": full})
    diff = head["active_minus_random_at_50pct"]
    assert diff["per_seed"] == pytest.approx({0: 0.0, 1: 0.2})
    assert diff["mean_ci"][0] == pytest.approx(0.1)
    assert head["labels_to_full_f1/active"] == {0: 120, 1: 80}
    assert head["labels_to_full_f1/random"] == {0: None, 1: None}


def test_checkpoint_every_lands_on_the_smallest_budget():
    plan = le.Plan(pool_rows=1600, test_rows=10, seeds=[0], arms=[], n_heads=2, budget_fracs=[0.05, 0.1])
    assert plan.checkpoint_every == 10  # 5% of 1600 = 80 labels = 10 steps of 8 rows


def test_checkpoint_keeper_copies_complete_checkpoints_only(tmp_path):
    run = tmp_path / "run"
    done = run / "ray_train" / "x" / "checkpoint_a"
    (done / "model" / "backbone").mkdir(parents=True)
    (done / "model" / "heads.safetensors").write_bytes(b"h")
    (done / "trainer_state.json").write_text(json.dumps({"step": 7, "rows_trained": 56}))
    half = run / "ray_train" / "x" / "checkpoint_b"
    (half / "model").mkdir(parents=True)  # no heads / state yet: still being written
    keeper = le.CheckpointKeeper(run, run / "kept")
    keeper.scan()
    kept = sorted(p.name for p in (run / "kept").iterdir())
    assert kept == ["step000007"]
    assert json.loads((run / "kept" / "step000007" / "trainer_state.json").read_text())["rows_trained"] == 56


@pytest.mark.ray
@pytest.mark.slow
def test_run_records_carry_finished_runs_to_a_fresh_work_dir(tmp_path):
    work, records, fresh = tmp_path / "work", tmp_path / "records", tmp_path / "fresh"
    done = work / "active_s0"
    (done / "kept").mkdir(parents=True)  # checkpoints: not part of a record
    for name, text in {"done.json": '{"arm": "active", "replay": 2}', "eval.json": "[]", "summary.json": "{}"}.items():
        (done / name).write_text(text)
    le.save_record(done, records, "abc123")
    assert sorted(p.name for p in (records / "active_s0").iterdir()) == ["backbone.txt", "done.json", "eval.json",
                                                                        "summary.json"]
    (fresh / "active_s0").mkdir(parents=True)  # a half-finished attempt of the same run (no done.json)
    (fresh / "active_s0" / "config.yaml").write_text("half")
    (fresh / "random_s0").mkdir()
    (fresh / "random_s0" / "done.json").write_text('{"arm": "random", "here": true}')
    (records / "random_s0").mkdir()  # a record of a run this machine already finished: the local one stays
    for name in ("done.json", "eval.json"):
        (records / "random_s0" / name).write_text('{"arm": "random", "replay": 2}')
    (records / "all_s0").mkdir()  # a record of another recipe (no replay; older records say nothing): stays out
    for name in ("done.json", "eval.json"):
        (records / "all_s0" / name).write_text('{"arm": "all"}')
    assert le.restore_records(records, fresh, replay=2) == ["active_s0"]
    assert (fresh / "active_s0" / "done.json").read_text() == '{"arm": "active", "replay": 2}'
    assert not (fresh / "active_s0" / "config.yaml").exists()
    assert json.loads((fresh / "random_s0" / "done.json").read_text())["here"] is True
    assert le.restore_records(records, fresh, replay=2) == []  # nothing left to restore
    assert le.restore_records(records, tmp_path / "no_replay", replay=0) == ["all_s0"]


def test_quick_run_writes_finite_monotone_outputs(ray_local, tmp_path):
    # The session's Ray instance (2 CPUs, like the one the benchmark starts on its own): the benchmark attaches.
    report = le.main(["--quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    out = tmp_path / "out"
    for name in ("label_efficiency.json", "label_efficiency.md", "label_efficiency.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    agg = json.loads((out / "label_efficiency.json").read_text())["aggregate"]
    assert agg["budgets"] == sorted(agg["budgets"]) and len(set(agg["budgets"])) == len(agg["budgets"])
    assert set(agg["arms"]) == {"active", "random", "all"}
    for arm in ("active", "random", "all"):  # the streaming loop's staleness, from each run's lag histogram
        assert math.isfinite(agg["arms"][arm]["lag_mean"][0]) and agg["arms"][arm]["lag_mean"][0] >= 0, arm
    for arm, runs in report["runs"].items():
        for r in runs:
            labels = [p["labels"] for p in r["points"]]
            assert labels == sorted(labels), arm
            assert labels[0] == 0 and labels[-1] == r["run"]["labels_used"], arm
            for p in r["points"]:
                assert math.isfinite(p["f1"]) and 0.0 <= p["f1"] <= 1.0
                assert p["judge_tokens"] == p["labels"] * 1920
    assert report["runs"]["all"][0]["run"]["labels_used"] == report["plan"]["pool_rows"]
