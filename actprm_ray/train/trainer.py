"""TorchTrainer assembly: scaling, storage, checkpoints, failure handling, and an unequal stream split."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ray.data import DataContext

from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer

from actprm_ray.config import Config, to_dict
from actprm_ray.train.loop import train_loop_per_worker


class UnequalSplit(DataConfig):
    """Ray Train splits with `streaming_split(equal=True)`, which drops rows to even out shards; a paid label
    must never be dropped, so split unequally and let the loop's join logic absorb uneven shards."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        out = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            hints = worker_node_ids if self._enable_shard_locality else None
            for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                out[i][name] = split
        return out


class MetricsLog(UserCallback):
    """Append rank 0's per-step metrics to `<run>/metrics.jsonl`, on the Train controller: one line per optimizer
    step (a report carries the steps since the last one under "history"), plus the final report's own line.

    Train V2 runs user callbacks here instead of Tune's logger callbacks; a TensorBoard or MLflow writer is
    another `UserCallback.after_report` like this one (pass it in `build_trainer(callbacks=...)`)."""

    def __init__(self, path: Path):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        report = dict(metrics[0])
        lines = report.pop("history", [])
        if report["final"] or not lines:
            lines = [*lines, report]
        lines[-1] = {**lines[-1], "checkpoint": checkpoint.path if checkpoint is not None else None}
        with open(self.path, "a") as f:
            f.writelines(json.dumps({"checkpoint": None, **line}) + "\n" for line in lines)


def scaling_config(cfg: Config) -> ScalingConfig:
    """The trainer's workers and what each one holds; `jobs/active_train.py --dry_run` prints it."""
    t = cfg.train
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    return ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources)


def build_trainer(cfg: Config, run_dir: Path, dataset, coordinator_name: str,
                  callbacks: list[UserCallback] | None = None,
                  dataset_config: DataConfig | None = None) -> TorchTrainer:
    """dataset_config: how the stream is split over workers (default UnequalSplit: no row dropped)."""
    t = cfg.train
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "run_dir": str(run_dir), "coordinator_name": coordinator_name},
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=str((run_dir / "ray_train").resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=t.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=[MetricsLog(run_dir / "metrics.jsonl"), *(callbacks or [])],
        ),
        datasets={"train": dataset},
        # Pass the driver's execution options explicitly: the split runs in the Train controller process, whose
        # own DataContext would otherwise replace our object-store budget (and so the backpressure bound).
        dataset_config=dataset_config or UnequalSplit(
            execution_options=copy.deepcopy(DataContext.get_current().execution_options)),
    )
