"""Experiment tracking (issue 19 item 2): a real Ray Train run through build_trainer with TensorBoard and MLflow
on, then the run's summary logged as jobs/active_train.py does; read back with TensorBoard's EventAccumulator and
mlflow.search_runs on the run's file store.

The trainer is driven directly (as tests/test_fsdp.py does) rather than through run_active: the scorer and
labeler actor pools would double the test's time (84 s against 43 s measured side by side on a loaded machine).
The test stands in for those stages: each row arrives as the label stage hands it over (label_status ok, or
skipped = trusted by the ensemble, with its step means), and the coordinator gets the stages' counters.
"""

from __future__ import annotations

import json
import time

import pytest

from actprm_ray import tracking


def test_lag_stats_and_flatten():
    assert tracking.lag_stats({"0": 6, "1": 3, "4": 1}) == {"mean": 0.7, "p90": 1.0, "max": 4.0, "rows": 10.0}
    assert tracking.lag_stats({}) == {}
    assert tracking.flatten({"a": {"b": 1, "c": {}}, "d": None}) == {"a.b": "1", "a.c": "{}", "d": "None"}


def test_config_refuses_a_backend_without_its_package(monkeypatch):
    import importlib.util

    from actprm_ray.config import ConfigError, load_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"tracking.mlflow=true needs the mlflow package.*\[tracking\]"):
        load_config(None, ["tracking.mlflow=true"])
    assert not load_config(None, []).tracking.mlflow  # off by default: the base install never needs it


def _rows(tokenizer, n: int) -> list[dict]:
    """n synthetic rows as the trainer receives them: every fourth one trusted (skipped), the rest labelled."""
    from actprm_ray.data.step_format import (DEFAULT_SEP, DEFAULT_SYSTEM_PROMPT, encode_trajectory,
                                             labels_from_first_error)
    from actprm_ray.data.synthetic import generate_pool

    rows = []
    for i, r in enumerate(generate_pool(n, seed=5)):
        labels = labels_from_first_error(r["first_error_step"], len(r["steps"]))
        e = encode_trajectory(tokenizer, r["question"], r["steps"], sep=DEFAULT_SEP,
                              system_prompt=DEFAULT_SYSTEM_PROMPT, labels=labels, max_length=512)
        rows.append({"id": f"row-{i:04d}", "valid": True, "label_status": "skipped" if i % 4 == 0 else "ok",
                     "label_reason": "", "model_version": 0, "oracle_first_error_step": r["first_error_step"],
                     "step_mean": [0.9] * len(r["steps"]), "input_ids": e.input_ids,
                     "readout_positions": e.readout_positions, "hard_labels": e.labels})
    return rows


@pytest.mark.ray
def test_tensorboard_and_mlflow_read_back(ray_local, tiny_backbone_dir, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    import mlflow
    import ray
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from actprm_ray.config import load_config
    from actprm_ray.model.ensemble_prm import EnsemblePRM, PRMConfig
    from actprm_ray.pipeline import outcomes as oc
    from actprm_ray.drivers.active import summarize
    from actprm_ray.pipeline.coordinator import RunCoordinator, coordinator_name
    from actprm_ray.train.trainer import build_trainer

    cfg = load_config(None, [
        "run.name=tracked", f"run.output_dir={tmp_path}", "model.n_heads=2", "model.max_length=512",
        "train.lr=1e-3", "train.warmup_steps=1", "train.total_steps=20", "train.micro_batch_size=4",
        "train.publish_every=1", "train.report_every=2", "train.checkpoint_every=100",
        "tracking.tensorboard=true", "tracking.mlflow=true"])
    run_dir = tmp_path / "tracked"
    model = EnsemblePRM.from_backbone(tiny_backbone_dir, PRMConfig(n_heads=2, init_seed=0))
    model.save_pretrained(run_dir / "init")
    rows = _rows(model.tokenizer, 32)  # 24 labelled: 6 optimizer steps of 4; 8 trusted
    name = coordinator_name("tracked")
    coordinator = RunCoordinator.options(name=name, namespace="actprm").remote(str(run_dir))
    ray.get(coordinator.add.remote({"scored": 32, "selected": 24}))  # what the score and label stages count
    started = time.time()
    try:
        result = build_trainer(cfg, run_dir, ray.data.from_items(rows, override_num_blocks=2), name).fit()
        snapshot = ray.get(coordinator.snapshot.remote())
    finally:
        ray.kill(coordinator)
    table, counts = oc.finalize(oc.read_outcome_parts(run_dir / "outcomes"), [r["id"] for r in rows])
    summary = summarize(cfg, run_dir, table, counts, snapshot, result, time.time() - started, 0)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    tracking.log_summary(cfg, summary)  # the driver's part (jobs/active_train.py)

    by_step = {}
    for line in map(json.loads, open(run_dir / "metrics.jsonl")):
        by_step.setdefault(line["step"], line)  # the final report's own line repeats the last step (its version is
        # the one published after that step); TrackingLog logs the step's own line, as here
    steps = sorted(by_step)
    assert steps == list(range(1, 7))
    losses = [by_step[s]["loss"] for s in steps]

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    tb = acc.Scalars("train/loss")
    assert [e.step for e in tb] == steps  # one point per optimizer step
    assert [e.value for e in tb] == pytest.approx(losses, rel=1e-6)  # float32 in the event file
    assert [e.value for e in acc.Scalars("train/model_version")] == [by_step[s]["version"] for s in steps]
    lag_means = [by_step[s]["lag_mean"] for s in steps]  # every row was scored by version 0: lag = the version
    assert [e.value for e in acc.Scalars("train/lag_mean")] == pytest.approx(lag_means) and max(lag_means) > 0
    assert {"train/lr", "train/grad_norm", "train/rows_per_s", "run/label_rate", "run/trust_pct", "lag/mean",
            "lag/p90", "final/label_rate", "final/trust_pct", "final/pseudo_label_accuracy", "final/lag_mean"} <= tags
    assert acc.Scalars("run/label_rate")[-1].value == pytest.approx(24 / 32)
    assert acc.Scalars("lag/mean")[-1].value == pytest.approx(tracking.lag_stats(summary["lag_histogram"])["mean"])
    assert acc.Scalars("final/trust_pct")[-1].value == pytest.approx(summary["trust_pct"], rel=1e-6)
    assert acc.Scalars("final/label_rate")[-1].step == steps[-1]

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading MLflow 3's file store needs it (docs/TRACKING.md)
    mlflow.set_tracking_uri((run_dir / "mlruns").as_uri())
    runs = mlflow.search_runs(experiment_names=["actprm"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["model.n_heads"] == "2"
    m = run.data.metrics
    assert summary["trust_pct"] == pytest.approx(100 * 8 / 32) and summary["pseudo_label_accuracy"] is not None
    for key in ("label_rate", "trust_pct", "pseudo_label_accuracy", "model_versions_published"):
        assert m[f"final/{key}"] == pytest.approx(summary[key])
    assert m["final/lag_p90"] == tracking.lag_stats(summary["lag_histogram"])["p90"] > 0
    assert m["run/trust_pct"] == pytest.approx(25.0)
    client = mlflow.tracking.MlflowClient()
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda h: h.step)
    assert [(h.step, h.value) for h in history] == list(zip(steps, losses))
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["summary.json"]
