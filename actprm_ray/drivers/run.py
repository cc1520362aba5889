"""The run skeleton: what every job does around its plan, so that a job supplies only its plan and its summary.

    with Run(cfg, directory, tag="actprm") as run:      # the directory exists, the clock runs
        run.save_config()                               # config.yaml: the resolved config beside the outputs
        run.init_ray()                                  # Ray with cfg.run / cfg.pipeline's settings
        run.start_coordinator(name, str(run.dir), ...)  # the run's named actor, on its ledger
        accounted = run.resume_outcomes()               # rows an earlier attempt of the run accounted for
        ...                                             # the job's plan, executed (run.train(dataset))
        snapshot = run.stop_coordinator()
        table, counts = run.finalize_outcomes(ids)      # outcomes.parquet: every row read, one outcome
        run.write_summary(summary)                      # summary.json
    # on the way out, success or not, the coordinator is killed

Every step is a method, called by the job in its own order: the jobs write the same files at the same moments
as before the skeleton (the active job saves its config before it places the label cache, supervised training
after it derives the LR schedule's length). Every job reads its command line with job_parser + parse_job_args:
its own flags, then --config FILE and the a.b=c overrides of the one config tree.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from actprm_ray.config import DEFAULT_LABEL_CACHE, Config, load_config, resolve_output_path, save_resolved
from actprm_ray.pipeline import outcomes as oc
from actprm_ray.pipeline import ray_env


class Run:
    """One job's run: its directory, resolved config, Ray, coordinator, outcome table and summary."""

    def __init__(self, cfg: Config, directory: str | Path, *, tag: str):
        self.cfg, self.dir, self.tag = cfg, Path(directory), tag
        self.started = time.time()
        self.coordinator, self.coordinator_name = None, ""
        self.dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._kill_coordinator()
        except Exception:  # noqa: BLE001 -- on the way out of a failed job, the job's own error is the one to see
            if exc_type is None:
                raise

    @property
    def wall_s(self) -> float:
        return time.time() - self.started

    def say(self, text: str) -> None:
        """A line for the user, tagged with the job: `[actprm] run dir ...`."""
        print(f"[{self.tag}] {text}", flush=True)

    def save_config(self) -> Path:
        return save_resolved(self.cfg, self.dir)

    def init_ray(self, **settings) -> None:
        init_ray_from(self.cfg, **settings)

    def place_label_cache(self) -> str | None:
        """A judge's label cache path, made absolute (None for the oracle, which pays nothing).

        Paid labels survive the run (and a rerun) in the run's own cache unless a shared one is configured; a
        relative path lies in the run directory, wherever the actors' working directory is."""
        judge = self.cfg.labeler.judge
        if self.cfg.labeler.kind == "oracle":
            return None
        judge.cache_path = str(resolve_output_path(judge.cache_path or DEFAULT_LABEL_CACHE, self.dir))
        return judge.cache_path

    def start_coordinator(self, name: str, *args):
        """The run's RunCoordinator, named `name` in the actprm namespace (args: coordinator.RunCoordinator's)."""
        from actprm_ray.pipeline.coordinator import RunCoordinator

        self.coordinator = RunCoordinator.options(name=name, namespace="actprm").remote(*args)
        self.coordinator_name = name
        return self.coordinator

    def stop_coordinator(self) -> dict:
        """The coordinator's last snapshot (budget, counters); then it is killed: nothing is granted after."""
        import ray

        snapshot = ray.get(self.coordinator.snapshot.remote())
        self._kill_coordinator()
        return snapshot

    def _kill_coordinator(self) -> None:
        if self.coordinator is not None:
            import ray

            ray.kill(self.coordinator)
            self.coordinator = None

    def resume_outcomes(self) -> frozenset:
        """Ids an earlier attempt of this run already accounted for. Parts of a checkpoint that never committed
        are set aside first (outcomes.quarantine_uncommitted): their rows are trained again."""
        parts = self.dir / "outcomes"
        oc.quarantine_uncommitted(parts, oc.committed_flushes(self.dir / "ray_train", self.cfg.run.name))
        return frozenset(oc.read_outcome_parts(parts).column("id").to_pylist())

    def train(self, dataset):
        """Stream `dataset` into the loop's TorchTrainer (train/trainer.py); returns Ray Train's Result."""
        from actprm_ray.train.trainer import build_trainer

        return build_trainer(self.cfg, self.dir, dataset, self.coordinator_name).fit()

    def compact_ledger(self, label_cache: str | None) -> None:
        """Fold the ledger's one-file-per-write parts, once no labeler or coordinator is left to write them."""
        from actprm_ray.label.cache import LabelCache
        from actprm_ray.ledger import grants_folder, run_ledger_uri

        if label_cache:
            LabelCache(label_cache).compact()
        grants_folder(run_ledger_uri(self.dir)).compact()

    def finalize_outcomes(self, pool_ids: list[str]) -> tuple[pa.Table, dict]:
        """outcomes.parquet: one outcome per pool row (not_reached where none was recorded); returns (table, counts)."""
        table, counts = oc.finalize(oc.read_outcome_parts(self.dir / "outcomes"), pool_ids)
        pq.write_table(table, self.dir / "outcomes.parquet")
        return table, counts

    def write_summary(self, summary: dict, name: str = "summary.json") -> dict:
        (self.dir / name).write_text(json.dumps(summary, indent=2))
        return summary


def init_ray_from(cfg: Config, **settings) -> None:
    """Attach to or start Ray (ray_env.init_ray) with the config's settings: run.ray_num_cpus, pipeline's
    no-progress timeout and Ray Data budgets; `settings` replace single ones."""
    p = cfg.pipeline
    ray_env.init_ray(**{"num_cpus": cfg.run.ray_num_cpus, "no_progress_timeout_s": p.no_progress_timeout_s,
                        "object_store_limit_mb": p.object_store_limit_mb, "block_size_kb": p.block_size_kb, **settings})


def job_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A job's command line: its own flags (added by the job), then parse_job_args adds --config and a.b=c."""
    return argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=epilog or "Any a.b=c argument overrides a key of the config tree "
                                                    "(docs/CONFIG.md lists every key).")


def parse_job_args(parser: argparse.ArgumentParser, argv: list[str],
                   default_config: Path | None = None) -> tuple[argparse.Namespace, Config]:
    """(the job's flags, the Config from `--config FILE`, else `default_config` where that file exists, and the
    a.b=c overrides); an unknown flag is an error, not an override."""
    default = str(default_config) if default_config is not None and Path(default_config).is_file() else None
    parser.add_argument("--config", default=default, metavar="FILE",
                        help=f"YAML config file, applied before the a.b=c overrides (default: {default or 'none'})")
    known, rest = parser.parse_known_args(argv)
    flags = [a for a in rest if a.startswith("-")]
    if flags:
        parser.error(f"unknown flags: {' '.join(flags)}")
    return known, load_config(known.config, rest)
