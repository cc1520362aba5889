"""Supervised (continued) training on a labelled set: stage 2 from a stage-1 checkpoint, or from a fresh backbone.

    labelled rows (Parquet/JSONL: id, question, steps + hard_labels and/or first_error_step)
      -> the pool reader (data/shards.py: a row it cannot read carries a read_error)
      -> LabelledCanonicalizeStage: Canonicalize (labels carried through), then attach_labels (label_status ok | failed)
      -> the loop's own TorchTrainer (train_loop_per_worker, loss, checkpoints: nothing is copied)

Every labelled row is "selected": the trainer's selection only acts for inline / stale-reselect settings, which
make no sense here and are rejected. Every row read ends in one of the loop's outcomes (invalid_input, with the
reader's or Canonicalize's reason / label_failed / trained), and a rerun with the same run name resumes like the
loop does.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from actprm_ray.config import Config, ConfigError, load_config, run_directory, save_resolved, to_dict
from actprm_ray.data.shards import LABEL_COLUMNS, POOL_COLUMNS
from actprm_ray.data.step_format import labels_from_first_error
from actprm_ray.pipeline.filter import CarryCanonicalizeStage, resolve_model_dir
from actprm_ray.pipeline.plan import Plan, StageSpec, drop_accounted
from actprm_ray.pipeline.stages import NO_ORACLE

# What a labelled row brings besides its label (the reader gives None where the set has none): the loop's values
# for a label that came with the data, not from a judge.
LABEL_DEFAULTS = {"label_source": "dataset", "label_key": "", "judge_tokens": 0, "judge_prompt_tokens": 0}
TRAIN_COLUMNS = (*POOL_COLUMNS, *LABEL_COLUMNS)


def check_labels(labels: list, num_steps: int) -> str:
    """"" if `labels` is a METHOD §1 labelling of a row with num_steps steps, else why not.

    Valid: 1..num_steps values in {0, 1} with nothing after the first 0 ([1, 1, 0] or [1, 1, 1]). A shorter
    all-ones list labels a prefix; the trainer cuts the input after the last labelled step either way.
    """
    if len(labels) == 0:
        return "hard_labels is empty"
    if any(y not in (0, 1) for y in labels):
        return f"hard_labels must be 0/1, got {sorted(set(labels) - {0, 1})}"
    if len(labels) > num_steps:
        return f"{len(labels)} hard_labels for {num_steps} steps"
    if 0 in labels and labels.index(0) != len(labels) - 1:
        return "hard_labels continue after the first error (METHOD §1 ends them at the first 0)"
    return ""


def attach_labels(batch: dict) -> dict:
    """Canonicalised labelled rows -> the label columns the training loop reads (see label/base.py).

    Labels come from hard_labels when present, else from first_error_step (already range-checked and cut to the
    visible steps by CanonicalizeStage); either way they are cut to the separators that survive truncation.
    """
    n = len(batch["id"])
    status, reason = np.array(["failed"] * n, dtype=object), np.array(["invalid input"] * n, dtype=object)
    hard, first = np.empty(n, dtype=object), np.full(n, NO_ORACLE, dtype=np.int64)
    given = batch.get("hard_labels")
    for i in range(n):
        hard[i] = []
        if not bool(batch["valid"][i]):
            continue
        visible = len(batch["readout_positions"][i])
        labels = None if given is None or _missing(given[i]) else [int(y) for y in given[i]]
        if labels:
            why = check_labels(labels, int(batch["num_steps_given"][i]))
        elif int(batch["oracle_first_error_step"][i]) != NO_ORACLE:
            labels, why = labels_from_first_error(int(batch["oracle_first_error_step"][i]), visible), ""
        else:
            why = "row has no label: needs hard_labels or first_error_step"
        if why:
            reason[i] = why
            continue
        labels = labels[:visible]
        status[i], reason[i], hard[i] = "ok", "", labels
        first[i] = labels.index(0) if 0 in labels else -1
    out = {**batch, "label_status": status, "label_reason": reason, "hard_labels": hard, "first_error_step": first}
    for col, default in LABEL_DEFAULTS.items():
        values = batch.get(col)
        filled = [default if values is None or _missing(values[i]) else values[i] for i in range(n)]
        out[col] = np.asarray(filled, dtype=object if isinstance(default, str) else np.int64)
    return out


def _missing(value) -> bool:
    """None, or NaN: between stages Ray Data may hand a column's nulls over as float NaN (an int column with
    nulls, a column with no value in the batch)."""
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


class LabelledCanonicalizeStage(CarryCanonicalizeStage):
    """CarryCanonicalizeStage, then attach_labels, in one stage: the labels leave it as plain lists. (Carried on as
    read, a column of int arrays with nulls would not convert to Arrow between stages.)"""

    def __call__(self, batch: dict) -> dict:
        return attach_labels(super().__call__(batch))


def prepare_init(cfg: Config, run_dir: Path, init_checkpoint: str | None) -> Path:
    """run_dir/init: a copy of the given checkpoint (stage 2), or fresh heads on model.backbone (from scratch).

    A copy, not a link: the run must survive its source run pruning old checkpoints (CheckpointConfig keeps 2).
    """
    init_dir = run_dir / "init"
    if (init_dir / "config.json").exists():
        return init_dir
    if init_checkpoint is None:
        from actprm_ray.pipeline.active import prepare_initial_model

        return prepare_initial_model(cfg, run_dir)
    tmp = run_dir / "init.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(resolve_model_dir(init_checkpoint), tmp)
    tmp.rename(init_dir)
    return init_dir


def build_supervised_plan(cfg: Config, init_dir: Path, *, accounted: frozenset, source: str) -> Plan:
    p = cfg.pipeline
    prm = json.loads((init_dir / "config.json").read_text())["actprm"]
    stages = []
    if accounted:
        stages.append(StageSpec("drop_done", drop_accounted, fn_kwargs={"ids": accounted}, num_cpus=p.map_num_cpus))
    # sep / system prompt from the checkpoint: the format its heads were trained with in stage 1.
    stages.append(StageSpec("canonicalize", LabelledCanonicalizeStage,
                            dict(tokenizer_dir=str(init_dir), sep=prm["sep"], system_prompt=prm["system_prompt"],
                                 max_length=cfg.model.max_length, carry=LABEL_COLUMNS),
                            batch_size=p.score_batch_size, num_cpus=p.map_num_cpus, actors=(1, 1),
                            remote_args=dict(max_restarts=p.max_restarts, max_task_retries=p.max_task_retries)))
    return Plan(source=source, stages=stages, sink=f"TorchTrainer x{cfg.train.num_workers} (trains every labelled row)")


def run_supervised(cfg: Config, init_checkpoint: str | None = None) -> dict:
    """Train on cfg.data.pool (a labelled set; "" = the synthetic pool with its own labels); return the summary."""
    import ray

    from actprm_ray.data.shards import index_pool, read_pool_rows, resolve_pool
    from actprm_ray.pipeline import outcomes as oc
    from actprm_ray.pipeline.coordinator import RunCoordinator, coordinator_name
    from actprm_ray.pipeline.ray_env import init_ray
    from actprm_ray.train.trainer import build_trainer

    if cfg.selection.inline:
        raise ConfigError("supervised training trains every labelled row: selection.inline does not apply")
    started = time.time()
    run_dir = run_directory(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    init_ray(num_cpus=cfg.run.ray_num_cpus, no_progress_timeout_s=cfg.pipeline.no_progress_timeout_s,
             object_store_limit_mb=cfg.pipeline.object_store_limit_mb)
    init_dir = prepare_init(cfg, run_dir, init_checkpoint)
    data = resolve_pool(cfg, run_dir)
    index = index_pool(data, limit=cfg.data.limit)  # every row's id up front: the accounting identity needs them
    ids = index.ids
    t = cfg.train
    if t.total_steps is None:  # one epoch over the set sets the LR schedule
        t.total_steps = max(1, math.ceil(len(ids) / (t.micro_batch_size * t.grad_accum * t.num_workers)))
    # Nothing scores with published weights here; a publish writes the whole model (~15 GB at 7B), so publish
    # only the once the loop does at start-up.
    t.publish_every = max(t.publish_every, t.total_steps + 1)
    save_resolved(cfg, run_dir)
    oc.quarantine_uncommitted(run_dir / "outcomes", oc.committed_flushes(run_dir / "ray_train", cfg.run.name))
    accounted = frozenset(oc.read_outcome_parts(run_dir / "outcomes").column("id").to_pylist())

    name = coordinator_name(cfg.run.name)
    coordinator = RunCoordinator.options(name=name, namespace="actprm").remote(str(run_dir))
    plan = build_supervised_plan(cfg, init_dir, accounted=accounted, source=data)
    print(f"[train] run dir {run_dir}\n[train] init {init_checkpoint or 'fresh heads on ' + cfg.model.backbone}\n"
          f"[train] plan:\n{plan.describe()}", flush=True)
    dataset = plan.apply(read_pool_rows(index, num_cpus=cfg.pipeline.map_num_cpus, columns=TRAIN_COLUMNS,
                                        max_retries=cfg.pipeline.map_max_retries))
    try:
        result = build_trainer(cfg, run_dir, dataset, name).fit()
    finally:
        ray.kill(coordinator)

    table, counts = oc.finalize(oc.read_outcome_parts(run_dir / "outcomes"), ids)
    pq.write_table(table, run_dir / "outcomes.parquet")
    reasons: dict[str, int] = {}
    for r in table.to_pylist():
        if r["outcome"] in (oc.INVALID_INPUT, oc.LABEL_FAILED):
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    metrics = result.metrics or {}
    summary = {
        "run_dir": str(run_dir), "init": str(init_checkpoint) if init_checkpoint else f"fresh:{cfg.model.backbone}",
        "data": data, "rows_read": len(ids), "outcomes": counts, "identity_holds": sum(counts.values()) == len(ids),
        "failure_reasons": reasons, "optimizer_steps": metrics.get("step"), "final_loss": metrics.get("loss"),
        "wall_time_s": time.time() - started,
        "checkpoint": None if result.checkpoint is None else str(Path(result.checkpoint.path) / "model"),
        "config": to_dict(cfg),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def parse_train_args(argv: list[str]) -> tuple[str | None, Config]:
    """`[--init_checkpoint DIR] [--config FILE] [a.b=c ...]`; the labelled set is data.pool."""
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="jobs/train.py", description="Supervised (continued) training of an EnsemblePRM on a labelled set.",
        epilog="a.b=c arguments override the shared config: data.pool=labelled.parquet train.lr=1e-5 ...")
    p.add_argument("--init_checkpoint", default=None,
                   help="stage-1 checkpoint (EnsemblePRM dir or a loop checkpoint holding model/); "
                        "default: fresh heads on model.backbone")
    p.add_argument("--config", default=None, help="YAML config file, applied before the a.b=c overrides")
    known, rest = p.parse_known_args(argv)
    flags = [a for a in rest if a.startswith("-")]
    if flags:
        p.error(f"unknown flags: {' '.join(flags)}")
    return known.init_checkpoint, load_config(known.config, rest)
