"""Experiment tracking, opt-in through the `tracking` config section: TensorBoard event files and an MLflow run.

Who writes what (both backends get the same names; see docs/TRACKING.md):
  * the Train controller, in train/trainer.py's TrackingLog (a Ray Train `UserCallback`, beside MetricsLog):
      train/*  every optimizer step, from the "history" each report carries (rank 0's view, as metrics.jsonl);
      run/*    once per report, the run coordinator's live counters (label rate, trust %, audit accuracy, version);
      lag/*    at the final report, the lag of the rows trained in this run (trainer/rank*.json);
  * the driver, after the run's summary.json is written (log_summary): final/* (the summary's own label rate,
    trust %, pseudo-label accuracy, lag mean / p90 / max, ...) at the last step, summary.json as an artifact.
The MLflow run is created once per run directory (its id is kept in <run dir>/tracking/mlflow_run.json, so a
resumed run and the driver's summary log into the same MLflow run); the resolved config is its params.

Both packages are optional (pyproject's `tracking` extra); this module imports them only when a backend is on.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

TB_DIR = "tensorboard"  # <run dir>/tensorboard: TensorBoard's --logdir
MLRUNS_DIR = "mlruns"  # <run dir>/mlruns: the default MLflow file store (no server)
MLFLOW_STATE = Path("tracking") / "mlflow_run.json"  # the run's MLflow run id, for resumes and the driver

# train/* name <- the trainer's report key (train/loop.py: metrics()).
STEP_METRICS = {"train/loss": "loss", "train/lr": "lr", "train/grad_norm": "grad_norm",
                "train/rows_per_s": "train_rows_per_s", "train/rows_trained": "rows_trained",
                "train/model_version": "version", "train/lag_mean": "lag_mean"}


def enabled(cfg) -> bool:
    return cfg.tracking.tensorboard or cfg.tracking.mlflow


def mlflow_tracking_uri(cfg, run_dir: Path) -> str:
    return cfg.tracking.mlflow_tracking_uri or (Path(run_dir) / MLRUNS_DIR).absolute().as_uri()


# -- what is logged ----------------------------------------------------------------------------------------------
def step_metrics(line: dict) -> dict[str, float]:
    """One metrics.jsonl line (one optimizer step) as train/* scalars."""
    return {name: float(line[key]) for name, key in STEP_METRICS.items() if line.get(key) is not None}


def live_metrics(snapshot: dict) -> dict[str, float]:
    """The coordinator's counters so far: rows sent to the labeler over rows scored (the streaming label rate),
    its complement as trust %, audited pseudo-label accuracy, and the newest published model version."""
    out = {"run/model_version": float(snapshot["version"]),
           "run/labels_granted": float(snapshot.get("budget", {}).get("labels", 0))}
    scored = snapshot.get("scored", 0)
    if scored:
        rate = snapshot.get("selected", 0) / scored
        out |= {"run/rows_scored": float(scored), "run/label_rate": rate, "run/trust_pct": 100.0 * (1.0 - rate)}
    if snapshot.get("audits"):
        out["run/audit_accuracy"] = snapshot.get("audits_correct", 0) / snapshot["audits"]
    return out


def lag_stats(histogram: dict) -> dict[str, float]:
    """Mean, 90th percentile and max of a lag histogram {lag: rows} (lag = trainer version - scoring version)."""
    counts = sorted((int(k), int(v)) for k, v in histogram.items() if int(v) > 0)
    n = sum(v for _, v in counts)
    if not n:
        return {}
    seen, p90 = 0, counts[-1][0]
    for lag, v in counts:
        seen += v
        if seen >= 0.9 * n:
            p90 = lag
            break
    return {"mean": sum(k * v for k, v in counts) / n, "p90": float(p90), "max": float(counts[-1][0]),
            "rows": float(n)}


def summary_metrics(summary: dict) -> dict[str, float]:
    """final/*: the run's summary.json figures (drivers/active.py: summarize), the ones a report quotes."""
    out = {"final/label_rate": summary["label_rate"], "final/trust_pct": summary["trust_pct"],
           "final/labels_used": summary["labels_used"], "final/rows_read": summary["rows_read"],
           "final/model_versions_published": summary["model_versions_published"],
           "final/optimizer_steps": summary["trainer"]["optimizer_steps"], "final/wall_time_s": summary["wall_time_s"],
           "final/rows_per_s_end_to_end": summary["stage_rows_per_s"]["end_to_end"],
           "final/pseudo_label_accuracy": summary.get("pseudo_label_accuracy"),
           "final/audit_accuracy_vs_judge": (summary.get("audit") or {}).get("accuracy_vs_judge")}
    out |= {f"final/lag_{k}": v for k, v in lag_stats(summary["lag_histogram"]).items()}
    return {k: float(v) for k, v in out.items() if v is not None}


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-5}} -> {"train.lr": "1e-05"}: the resolved config as MLflow params."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = str(v)[:6000]  # MLflow's limit on one param value
    return out


# -- the backends --------------------------------------------------------------------------------------------------
class TensorBoard:
    """Scalars into <run dir>/tensorboard. Each opening is a new event file there (a resume, the driver's summary)."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TB_DIR))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)

    def log_summary_file(self, path: Path, step: int) -> None:
        self.writer.add_text("summary", f"```\n{Path(path).read_text()}\n```", global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()


class MLflow:
    """One MLflow run per run directory, through MlflowClient (explicit run ids: no global active run, so the
    Train controller and the driver can each hold it)."""

    def __init__(self, cfg, run_dir: Path, params: dict[str, str]):
        uri = mlflow_tracking_uri(cfg, run_dir)
        if uri.startswith("file:"):
            # MLflow 3.x keeps the file store in "maintenance mode" and refuses it unless this is set; it is the
            # serverless local store this project wants (sqlite needs the full mlflow: SQLAlchemy and Alembic).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        state_path = Path(run_dir) / MLFLOW_STATE
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        if state.get("tracking_uri") == uri:
            self.run_id = state["run_id"]  # a resumed run or the driver's summary: the same MLflow run
            self.client.update_run(self.run_id, status="RUNNING")
            return
        t = cfg.tracking
        experiment = self.client.get_experiment_by_name(t.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(t.experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=cfg.run.name,
                                             tags={"actprm.run_dir": str(run_dir)}).info.run_id
        self._batches(params=[(k, v) for k, v in params.items()])  # once: a resume may change budget etc.
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id}))

    def _batches(self, metrics=(), params=()) -> None:
        from mlflow.entities import Param

        metrics, params = list(metrics), [Param(k, v) for k, v in params]
        for i in range(0, len(metrics), 1000):  # MLflow's limits per log_batch: 1000 metrics, 100 params
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._batches(metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_summary_file(self, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def flush(self) -> None:
        pass  # every call above is already on the store

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def open_backends(cfg, run_dir: Path) -> list:
    """The backends the config switches on, opened in the calling process (the Train controller, the driver)."""
    from actprm_ray.config import to_dict

    out = []
    if cfg.tracking.tensorboard:
        out.append(TensorBoard(run_dir))
    if cfg.tracking.mlflow:
        out.append(MLflow(cfg, run_dir, flatten(to_dict(cfg))))
    return out


def last_step(metrics_log: Path) -> int:
    """The last optimizer step in metrics.jsonl (0 when nothing was trained)."""
    if not Path(metrics_log).exists():
        return 0
    lines = Path(metrics_log).read_text().splitlines()
    return int(json.loads(lines[-1])["step"]) if lines else 0


def log_summary(cfg, summary: dict) -> None:
    """The driver's end of the run: summary.json's figures as final/* at the last step, and the file itself
    (an MLflow artifact; TensorBoard text). Call after summary.json is written; a no-op with tracking off."""
    if not enabled(cfg):
        return
    run_dir = Path(summary["run_dir"])
    step = last_step(run_dir / "metrics.jsonl")
    metrics = summary_metrics(summary)
    for backend in open_backends(cfg, run_dir):
        backend.log(metrics, step)
        if (run_dir / "summary.json").exists():
            backend.log_summary_file(run_dir / "summary.json", step)
        backend.close()
