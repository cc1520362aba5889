"""Offline labelling (jobs/label.py): judge a selected set (e.g. the filter's retained rows) into training rows.

    read rows -> check + select -> Label (actor pool: vllm | http | oracle; cache first) -> training rows -> Parquet

Every row read comes out as exactly one training row: a row that fails the pool-row checks (data/shards.py,
stages.check_pool_row; a repeated id included) is never sent to the judge and comes out with label_status
`invalid_input` and the reason. The label job has no PRM tokenizer, so it does not judge length: a row longer
than model.max_length is labelled and cut where it is trained.

Resumable through the label cache: a rerun over the same rows pays zero judge tokens for rows already judged
(successes and parse failures alike), so a killed run is simply run again.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from actprm_ray.config import DEFAULT_LABEL_CACHE, Config, load_config, resolve_output_path, save_resolved
from actprm_ray.data.shards import POOL_COLUMNS, index_pool, read_pool_rows
from actprm_ray.data.step_format import StepFormatError
from actprm_ray.pipeline.active import TOKENS_PER_CRITIQUE
from actprm_ray.pipeline.filter import reason_kind
from actprm_ray.pipeline.outcomes import INVALID_INPUT
from actprm_ray.pipeline.plan import StageSpec, actor_fault_args, labeler_class, task_fault_args
from actprm_ray.pipeline.ray_env import init_ray
from actprm_ray.pipeline.stages import NO_ORACLE, LabelStage, check_pool_row


@dataclass
class LabelArgs:
    input: str
    output: str


INPUT_COLUMNS = (*POOL_COLUMNS, "selected")
STATUSES = ("ok", "failed", "transient", "skipped", "over_budget", INVALID_INPUT)


def prepare_rows(batch: dict, *, sep: str) -> dict:
    """Read rows -> what a labeler reads: canonical question/steps, selected, the oracle's first error, and
    valid/invalid_reason. An invalid row is not selected, so no judge ever sees it."""
    n = len(batch["id"])
    cols = {k: [] for k in ("question", "steps", "selected", "oracle_first_error_step", "valid", "invalid_reason")}
    for i in range(n):
        try:
            row, k = check_pool_row(batch["question"][i], batch["steps"][i], batch["first_error_step"][i], sep=sep,
                                    read_error=str(batch["read_error"][i]))
            # A row without `selected` is to be labelled; the filter's `selected` is honoured.
            selected = batch["selected"][i] is None or bool(batch["selected"][i])
            values = (row.question, row.steps, selected, k, True, "")
        except StepFormatError as e:
            values = ("", [], False, NO_ORACLE, False, str(e))
        for name, v in zip(cols, values):
            cols[name].append(v)
    out = {"id": batch["id"], **{k: _obj(v) for k, v in cols.items()}}
    out["selected"], out["valid"] = np.asarray(cols["selected"], dtype=bool), np.asarray(cols["valid"], dtype=bool)
    out["oracle_first_error_step"] = np.asarray(cols["oracle_first_error_step"], dtype=np.int64)
    return out


def _obj(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


TRAINING_ROW_SCHEMA = pa.schema([
    ("id", pa.string()), ("question", pa.string()), ("steps", pa.list_(pa.string())),
    ("hard_labels", pa.list_(pa.int64())), ("first_error_step", pa.int64()), ("label_status", pa.string()),
    ("label_reason", pa.string()), ("label_source", pa.string()), ("label_key", pa.string()),
    ("label_cache_hit", pa.bool_()), ("judge_prompt_tokens", pa.int64()), ("judge_tokens", pa.int64()),
    ("label_attempts", pa.int64()),
])


def to_training_rows(batch: dict) -> pa.Table:
    """METHOD §1: steps after the first error are dropped, so len(hard_labels) == len(steps) on ok rows.
    Returned as a typed Arrow table so every output file has the same schema."""
    cols = {name: [] for name in TRAINING_ROW_SCHEMA.names}
    for i in range(len(batch["id"])):
        labels = [int(y) for y in batch["hard_labels"][i]]
        steps = [str(s) for s in batch["steps"][i]]
        cols["steps"].append(steps[: len(labels)] if batch["label_status"][i] == "ok" else steps)
        cols["hard_labels"].append(labels)
        for name in TRAINING_ROW_SCHEMA.names:
            if name not in ("steps", "hard_labels"):
                v = batch[name][i]
                cols[name].append(v.item() if hasattr(v, "item") else v)
        if not batch["valid"][i]:  # the labeler skipped it (not selected); say why
            cols["label_status"][-1], cols["label_reason"][-1] = INVALID_INPUT, str(batch["invalid_reason"][i])
    return pa.Table.from_pydict(cols, schema=TRAINING_ROW_SCHEMA)


def run_label(cfg: Config, args: LabelArgs) -> dict:
    import ray

    from actprm_ray.pipeline.coordinator import RunCoordinator, coordinator_name, judge_counters

    started = time.time()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out)
    if cfg.labeler.kind != "oracle":
        # A relative cache path lies in the output folder, wherever the actors' working directory is.
        cfg.labeler.judge.cache_path = str(resolve_output_path(cfg.labeler.judge.cache_path or DEFAULT_LABEL_CACHE,
                                                               out))
    p = cfg.pipeline
    init_ray(num_cpus=cfg.run.ray_num_cpus, no_progress_timeout_s=p.no_progress_timeout_s,
             object_store_limit_mb=p.object_store_limit_mb, block_size_kb=p.block_size_kb)
    name = coordinator_name(f"label-{cfg.run.name}")
    # The output folder holds the job's ledger: max_labels caps labels over every rerun into it.
    coordinator = RunCoordinator.options(name=name, namespace="actprm").remote(
        str(out.resolve()), cfg.budget.max_labels, cfg.budget.max_judge_tokens, cfg.labeler.judge.max_tokens,
        cfg.labeler.judge.cache_path)
    stage = StageSpec("label", LabelStage, dict(labeler_cls=labeler_class(cfg.labeler.kind),
                                                labeler_config=cfg.labeler.judge, coordinator=coordinator),
                      batch_size=p.label_batch_size, num_cpus=p.label_num_cpus, num_gpus=p.label_num_gpus,
                      actors=(1, p.label_actors), remote_args=actor_fault_args(cfg))
    retry = task_fault_args(cfg)
    index = index_pool(args.input, limit=cfg.data.limit)  # every row's id: the summary checks each comes out once
    ds = read_pool_rows(index, num_cpus=p.map_num_cpus, columns=INPUT_COLUMNS, max_retries=p.map_max_retries)
    ds = ds.map_batches(prepare_rows, fn_kwargs={"sep": cfg.model.sep}, batch_format="numpy",
                        num_cpus=p.map_num_cpus, **retry)
    ds = stage.apply(ds).map_batches(to_training_rows, batch_format="numpy", num_cpus=p.map_num_cpus, **retry)  # -> Arrow
    for old in (out / "labelled").glob("*.parquet") if (out / "labelled").exists() else []:
        old.unlink()  # a rerun rewrites the whole set (from the cache), never appends duplicates
    ds.write_parquet(str(out / "labelled"), ray_remote_args={"num_cpus": p.map_num_cpus, **retry})
    snapshot = ray.get(coordinator.snapshot.remote())
    ray.kill(coordinator)

    t = pads.dataset(str(out / "labelled"), format="parquet").to_table(
        columns=["id", "label_status", "label_reason", "label_cache_hit", "judge_prompt_tokens",
                 "judge_tokens"]).to_pylist()
    status = {s: sum(1 for r in t if r["label_status"] == s) for s in STATUSES}
    paid = sum(1 for r in t if r["judge_tokens"] > 0)
    invalid = Counter(reason_kind(r["label_reason"]) for r in t if r["label_status"] == INVALID_INPUT)
    summary = {
        "input": args.input, "output": str(out), "rows_read": len(index.ids), "rows": len(t), "status": status,
        # Every row read comes out exactly once, with one status.
        "identity_holds": sorted(r["id"] for r in t) == sorted(index.ids) and sum(status.values()) == len(t),
        "invalid_reasons": dict(invalid.most_common()),
        "cache_hits": sum(1 for r in t if r["label_cache_hit"]),
        "judge_prompt_tokens": sum(r["judge_prompt_tokens"] for r in t),
        "judge_generated_tokens": sum(r["judge_tokens"] for r in t),
        "failure_rate": status["failed"] / max(1, status["ok"] + status["failed"]),
        "cost_model_tokens_N_times_C": (status["ok"] + status["failed"]) * TOKENS_PER_CRITIQUE,
        "rows_paid_this_run": paid, "budget": snapshot["budget"], "judge": judge_counters(snapshot),
        "wall_time_s": time.time() - started,
    }
    (out / "label_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def parse_label_args(argv: list[str]) -> tuple[LabelArgs, Config]:
    """`--input PATH --output DIR [--config FILE] [a.b=c ...]` (labeler.*, budget.*, pipeline.* overrides)."""
    p = argparse.ArgumentParser(prog="jobs/label.py", allow_abbrev=False,
                                description="Judge a selected set into labelled training rows (cache-backed).")
    p.add_argument("--input", required=True, help="Parquet/JSONL rows with id, question, steps (e.g. filter retained/)")
    p.add_argument("--output", required=True, help="output folder: labelled/*.parquet + label_summary.json")
    p.add_argument("--config", default=None, help="YAML config file, applied before the a.b=c overrides")
    known, rest = p.parse_known_args(argv)
    flags = [a for a in rest if a.startswith("-")]
    if flags:
        p.error(f"unknown flags: {' '.join(flags)}")
    return LabelArgs(input=known.input, output=known.output), load_config(known.config, rest)
