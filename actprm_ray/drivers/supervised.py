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

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from actprm_ray.config import Config, ConfigError, TrainConfig, run_directory, to_dict
from actprm_ray.data.rows import NO_ORACLE, training_labels
from actprm_ray.data.shards import LABEL_COLUMNS, POOL_COLUMNS
from actprm_ray.data.step_format import StepFormatError, first_error_from_labels
from actprm_ray.pipeline import outcomes as oc
from actprm_ray.pipeline.filter import CarryCanonicalizeStage, resolve_model_dir
from actprm_ray.pipeline.plan import Plan, StageSpec, drop_accounted
from actprm_ray.drivers.run import Run, job_parser, parse_job_args

# What a labelled row brings besides its label (the reader gives None where the set has none): the loop's values
# for a label that came with the data, not from a judge.
LABEL_DEFAULTS = {"label_source": "dataset", "label_key": "", "judge_tokens": 0, "judge_prompt_tokens": 0}
TRAIN_COLUMNS = (*POOL_COLUMNS, *LABEL_COLUMNS)


# The columns attach_labels returns: the label columns the training loop reads (see label/base.py).
ATTACHED_COLUMNS = ("label_status", "label_reason", "hard_labels", "first_error_step", *LABEL_DEFAULTS)


def attach_labels(batch: dict) -> dict:
    """Canonicalised labelled rows -> the label columns the training loop reads (ATTACHED_COLUMNS).

    Labels come from hard_labels when present, else from first_error_step (data/rows.py: training_labels);
    either way they are cut to the separators that survive truncation.
    """
    n = len(batch["id"])
    status, reason = np.array(["failed"] * n, dtype=object), np.array(["invalid input"] * n, dtype=object)
    hard, first = np.empty(n, dtype=object), np.full(n, NO_ORACLE, dtype=np.int64)
    given = batch.get("hard_labels")
    for i in range(n):
        hard[i] = []
        if not bool(batch["valid"][i]):
            continue
        labels = None if given is None or _missing(given[i]) else [int(y) for y in given[i]]
        try:
            labels = training_labels(labels, int(batch["oracle_first_error_step"][i]),
                                     num_steps_given=int(batch["num_steps_given"][i]),
                                     visible_steps=len(batch["readout_positions"][i]))
        except StepFormatError as e:
            reason[i] = str(e)
            continue
        status[i], reason[i], hard[i], first[i] = "ok", "", labels, first_error_from_labels(labels)
    out = {"label_status": status, "label_reason": reason, "hard_labels": hard, "first_error_step": first}
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

    adds = (*CarryCanonicalizeStage.adds, *ATTACHED_COLUMNS)

    def process(self, batch: dict) -> dict:
        canonical = super().process(batch)
        carried = {c: batch[c] for c in self.keeps if c in batch}
        return {**canonical, **attach_labels({**carried, **canonical})}


def prepare_init(cfg: Config, run_dir: Path, init_checkpoint: str | None) -> Path:
    """run_dir/init: a copy of the given checkpoint (stage 2), or fresh heads on model.backbone (from scratch).

    A copy, not a link: the run must survive its source run pruning old checkpoints (CheckpointConfig keeps 2).
    """
    init_dir = run_dir / "init"
    if (init_dir / "config.json").exists():
        return init_dir
    if init_checkpoint is None:
        from actprm_ray.drivers.active import prepare_initial_model

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
    from actprm_ray.data.shards import index_pool, read_pool_rows, resolve_pool
    from actprm_ray.pipeline.coordinator import coordinator_name

    if cfg.selection.inline:
        raise ConfigError("supervised training trains every labelled row: selection.inline does not apply")
    with Run(cfg, run_directory(cfg), tag="train") as run:
        # Its Ray Data blocks stay at ray_env.init_ray's default size: this job never applied pipeline.block_size_kb.
        run.init_ray(block_size_kb=256)
        init_dir = prepare_init(cfg, run.dir, init_checkpoint)
        data = resolve_pool(cfg, run.dir)
        index = index_pool(data, limit=cfg.data.limit)  # every row's id up front: the accounting identity needs them
        fit_schedule(cfg.train, len(index.ids))
        run.save_config()
        accounted = run.resume_outcomes()
        run.start_coordinator(coordinator_name(cfg.run.name), str(run.dir))
        plan = build_supervised_plan(cfg, init_dir, accounted=accounted, source=data)
        run.say(f"run dir {run.dir}\n[train] init {init_checkpoint or 'fresh heads on ' + cfg.model.backbone}\n"
                f"[train] plan:\n{plan.describe()}")
        dataset = plan.apply(read_pool_rows(index, num_cpus=cfg.pipeline.map_num_cpus, columns=TRAIN_COLUMNS,
                                            max_retries=cfg.pipeline.map_max_retries))
        result = run.train(dataset)
        run.stop_coordinator()
        table, counts = run.finalize_outcomes(index.ids)
        metrics = result.metrics or {}
        return run.write_summary({
            "run_dir": str(run.dir),
            "init": str(init_checkpoint) if init_checkpoint else f"fresh:{cfg.model.backbone}",
            "data": data, "rows_read": len(index.ids), "outcomes": counts,
            "identity_holds": sum(counts.values()) == len(index.ids), "failure_reasons": failure_reasons(table),
            "optimizer_steps": metrics.get("step"), "final_loss": metrics.get("loss"), "wall_time_s": run.wall_s,
            "checkpoint": None if result.checkpoint is None else str(Path(result.checkpoint.path) / "model"),
            "config": to_dict(cfg),
        })


def fit_schedule(t: TrainConfig, rows: int) -> None:
    """train.total_steps: one epoch over the set when not given (it sets the LR schedule; replayed micro-batches
    are steps too); and no publishes but the loop's one at start-up: nothing scores with published weights here,
    and a publish writes the whole model (~15 GB at 7B)."""
    if t.total_steps is None:
        t.total_steps = max(1, math.ceil(rows * (1 + t.replay) / (t.micro_batch_size * t.grad_accum * t.num_workers)))
    t.publish_every = max(t.publish_every, t.total_steps + 1)


def failure_reasons(table: pa.Table) -> dict[str, int]:
    """Rows that were not trained (invalid_input, label_failed): how many for each reason."""
    reasons: dict[str, int] = {}
    for r in table.to_pylist():
        if r["outcome"] in (oc.INVALID_INPUT, oc.LABEL_FAILED):
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return reasons


def parse_train_args(argv: list[str]) -> tuple[str | None, Config]:
    """`[--init_checkpoint DIR] [--config FILE] [a.b=c ...]`; the labelled set is data.pool."""
    p = job_parser("jobs/train.py", "Supervised (continued) training of an EnsemblePRM on a labelled set.",
                   epilog="a.b=c arguments override the shared config: data.pool=labelled.parquet train.lr=1e-5 ...")
    p.add_argument("--init_checkpoint", default=None,
                   help="stage-1 checkpoint (EnsemblePRM dir or a loop checkpoint holding model/); "
                        "default: fresh heads on model.backbone")
    known, cfg = parse_job_args(p, argv)
    return known.init_checkpoint, cfg
