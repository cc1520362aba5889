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

    Train V2 runs user callbacks here instead of Tune's logger callbacks; TrackingLog (TensorBoard, MLflow) is
    another `UserCallback.after_report` like this one."""

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


class TrackingLog(UserCallback):
    """TensorBoard and/or MLflow (config `tracking`; actprm_ray/tracking.py), on the Train controller like
    MetricsLog: train/* for every optimizer step in the report's history (the same points as metrics.jsonl),
    run/* from one coordinator snapshot per report, lag/* of the rows trained in this run at the final report.
    The writers open on first use, in the controller (the callback is pickled there)."""

    def __init__(self, cfg: Config, run_dir: Path, coordinator_name: str):
        self.cfg, self.run_dir, self.coordinator_name = cfg, run_dir, coordinator_name
        self.backends = None
        self.logged_step = -1

    def after_report(self, run_context, metrics, checkpoint) -> None:
        from actprm_ray import tracking

        if self.backends is None:
            self.backends = tracking.open_backends(self.cfg, self.run_dir)
        report = dict(metrics[0])
        lines = report.pop("history", [])
        if not lines and report["step"] > self.logged_step:  # e.g. a restored group's first report: no history
            lines = [report]
        step = report["step"]
        scalars = [(tracking.step_metrics(line), line["step"]) for line in lines]
        scalars.append((self._live(), step))
        if report["final"]:
            scalars.append(({f"lag/{k}": v for k, v in tracking.lag_stats(self._lags()).items()}, step))
        for backend in self.backends:
            for values, at in scalars:
                if values:
                    backend.log(values, at)
            backend.flush()
        self.logged_step = max(self.logged_step, step)
        if report["final"]:
            for backend in self.backends:
                backend.close()
            self.backends = None

    def after_exception(self, run_context, worker_exceptions) -> None:
        for backend in self.backends or []:  # the group may restart (train.max_failures): flush, keep open
            backend.flush()

    def _live(self) -> dict:
        import ray

        from actprm_ray import tracking

        try:  # one small actor call per report, on the controller; a metric must never stop the run
            handle = ray.get_actor(self.coordinator_name, namespace="actprm")
            return tracking.live_metrics(ray.get(handle.snapshot.remote(), timeout=10))
        except Exception:  # noqa: BLE001
            return {}

    def _lags(self) -> dict:
        """This run's lag histogram, summed over ranks (each writes trainer/rank<r>.json before the final report)."""
        lags: dict[int, int] = {}
        for f in sorted((self.run_dir / "trainer").glob("rank*.json")):
            for k, v in json.loads(f.read_text())["lags"].items():
                lags[int(k)] = lags.get(int(k), 0) + v
        return lags


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
    """dataset_config: how the stream is split over workers (default UnequalSplit: no row dropped).
    Callbacks: MetricsLog always, TrackingLog when the config's `tracking` section switches a backend on."""
    t = cfg.train
    tracking = [TrackingLog(cfg, run_dir, coordinator_name)] if cfg.tracking.tensorboard or cfg.tracking.mlflow else []
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "run_dir": str(run_dir), "coordinator_name": coordinator_name},
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=str((run_dir / "ray_train").resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=t.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=[MetricsLog(run_dir / "metrics.jsonl"), *tracking, *(callbacks or [])],
        ),
        datasets={"train": dataset},
        # Pass the driver's execution options explicitly: the split runs in the Train controller process, whose
        # own DataContext would otherwise replace our object-store budget (and so the backpressure bound).
        dataset_config=dataset_config or UnequalSplit(
            execution_options=copy.deepcopy(DataContext.get_current().execution_options)),
    )
