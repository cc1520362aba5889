"""The fault-tolerance settings are config fields with documented defaults, and they reach Ray: actor restarts and
batch re-runs for actor stages, bounded task retries for stateless stages, Ray Train's FailureConfig and
checkpoint retention. Checked on the objects handed to Ray, without starting it."""

from __future__ import annotations

from pathlib import Path

import pytest

from actprm_ray.config import ConfigError, load_config
from actprm_ray.pipeline.plan import build_active_plan

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "pipeline.max_restarts": 2, "pipeline.max_task_retries": -1, "pipeline.map_max_retries": 3,
    "pipeline.no_progress_timeout_s": 60.0, "train.max_failures": 0, "train.checkpoint_every": 50,
    "train.checkpoints_to_keep": 2, "labeler.judge.max_attempts": 1, "labeler.judge.http.max_retries": 5,
}


def test_defaults_are_documented_in_the_config_reference():
    cfg = load_config()
    doc = (REPO / "docs" / "CONFIG.md").read_text()
    for key, default in SETTINGS.items():
        section, _, name = key.rpartition(".")
        obj = cfg
        for part in section.split("."):
            obj = getattr(obj, part)
        assert getattr(obj, name) == default, key
        assert f"| `{key}` |" in doc, f"{key} missing from docs/CONFIG.md"


class RecordingDataset:
    """Stands in for a Ray Dataset: records every map_batches call (what Ray would receive)."""

    def __init__(self):
        self.calls: dict[str, dict] = {}

    def map_batches(self, fn, **kwargs):
        self.calls[getattr(fn, "__name__", str(fn))] = kwargs
        return self


def test_plan_stages_carry_the_configured_retries():
    cfg = load_config(None, ["pipeline.max_restarts=5", "pipeline.max_task_retries=4", "pipeline.map_max_retries=7"])
    plan = build_active_plan(cfg, init_dir="unused", coordinator_name="", accounted=frozenset({"done"}))
    calls = plan.apply(RecordingDataset()).calls
    assert set(calls) == {"drop_accounted", "CanonicalizeStage", "ScoreStage", "select_batch", "LabelStage"}
    for actor_stage in ("CanonicalizeStage", "ScoreStage", "LabelStage"):
        kw = calls[actor_stage]
        assert (kw["max_restarts"], kw["max_task_retries"]) == (5, 4), actor_stage
        assert "max_retries" not in kw  # a task option; Ray rejects it on actors
    for task_stage in ("drop_accounted", "select_batch"):
        assert calls[task_stage]["max_retries"] == 7 and "max_restarts" not in calls[task_stage], task_stage


def test_trainer_gets_failure_and_checkpoint_settings(monkeypatch, tmp_path):
    from actprm_ray.train import trainer as trainer_module

    built = {}
    monkeypatch.setattr(trainer_module, "TorchTrainer", lambda *args, **kwargs: built.update(kwargs))
    cfg = load_config(None, ["train.max_failures=3", "train.checkpoints_to_keep=4"])
    trainer_module.build_trainer(cfg, tmp_path, dataset=None, coordinator_name="c")
    run = built["run_config"]
    assert run.failure_config.max_failures == 3 and run.checkpoint_config.num_to_keep == 4


@pytest.mark.parametrize("override", ["pipeline.max_restarts=-2", "pipeline.max_task_retries=-5",
                                      "pipeline.map_max_retries=-2", "train.checkpoints_to_keep=0"])
def test_out_of_range_settings_are_rejected(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])


def test_unbounded_is_spelled_minus_one():
    cfg = load_config(None, ["pipeline.max_restarts=-1", "pipeline.max_task_retries=-1", "pipeline.map_max_retries=-1"])
    assert (cfg.pipeline.max_restarts, cfg.pipeline.max_task_retries, cfg.pipeline.map_max_retries) == (-1, -1, -1)
