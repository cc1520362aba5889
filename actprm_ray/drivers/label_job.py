"""Offline labelling (jobs/label.py): judge a selected set (e.g. the filter's retained rows) into training rows.

    read rows -> check + select -> Label (actor pool: vllm | http | oracle; cache first) -> training rows -> Parquet

Every row read comes out as exactly one training row: a row that fails the pool-row checks (data/shards.py,
data/rows.py check_pool_row; a repeated id included) is never sent to the judge and comes out with label_status
`invalid_input` and the reason. The label job has no PRM tokenizer, so it does not judge length: a row longer
than model.max_length is labelled and cut where it is trained.

Resumable through the label cache: a rerun over the same rows pays zero judge tokens for rows already judged
(successes and parse failures alike), so a killed run is simply run again.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from actprm_ray.config import Config
from actprm_ray.data.rows import NO_ORACLE, check_pool_row
from actprm_ray.data.shards import POOL_COLUMNS, PoolIndex, index_pool, read_pool_rows
from actprm_ray.data.step_format import StepFormatError
from actprm_ray.drivers.active import TOKENS_PER_CRITIQUE
from actprm_ray.pipeline.filter import reason_kind
from actprm_ray.pipeline.outcomes import INVALID_INPUT
from actprm_ray.pipeline.plan import StageSpec, actor_fault_args, labeler_class, task_fault_args
from actprm_ray.drivers.run import Run, job_parser, parse_job_args
from actprm_ray.pipeline.stages import LabelStage, Stage


@dataclass
class LabelArgs:
    input: str
    output: str


INPUT_COLUMNS = (*POOL_COLUMNS, "selected")
STATUSES = ("ok", "failed", "transient", "skipped", "over_budget", INVALID_INPUT)


class PrepareRowsStage(Stage):
    """Read rows -> what a labeler reads: canonical question/steps, selected, the oracle's first error, and
    valid/invalid_reason. An invalid row is not selected, so no judge ever sees it."""

    needs = (*INPUT_COLUMNS, "read_error")
    adds = ("question", "steps", "selected", "oracle_first_error_step", "valid", "invalid_reason")
    keeps = ("id",)

    def __init__(self, *, sep: str):
        self.sep = sep

    def process(self, batch: dict) -> dict:
        cols = {k: [] for k in self.adds}
        for i in range(len(batch["id"])):
            try:
                row, k = check_pool_row(batch["question"][i], batch["steps"][i], batch["first_error_step"][i],
                                        sep=self.sep, read_error=str(batch["read_error"][i]))
                # A row without `selected` is to be labelled; the filter's `selected` is honoured.
                selected = batch["selected"][i] is None or bool(batch["selected"][i])
                values = (row.question, row.steps, selected, k, True, "")
            except StepFormatError as e:
                values = ("", [], False, NO_ORACLE, False, str(e))
            for name, v in zip(cols, values):
                cols[name].append(v)
        out = {k: _obj(v) for k, v in cols.items()}
        out["selected"], out["valid"] = np.asarray(cols["selected"], dtype=bool), np.asarray(cols["valid"], dtype=bool)
        out["oracle_first_error_step"] = np.asarray(cols["oracle_first_error_step"], dtype=np.int64)
        return out


def prepare_rows(batch: dict, *, sep: str) -> dict:
    """PrepareRowsStage as a map_batches function: it has no setup worth an actor."""
    return PrepareRowsStage(sep=sep)(batch)


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
    from actprm_ray.pipeline.coordinator import coordinator_name

    with Run(cfg, args.output, tag="label") as run:
        run.save_config()
        run.place_label_cache()
        run.init_ray()
        # The output folder holds the job's ledger: max_labels caps labels over every rerun into it.
        coordinator = run.start_coordinator(
            coordinator_name(f"label-{cfg.run.name}"), str(run.dir.resolve()), cfg.budget.max_labels,
            cfg.budget.max_judge_tokens, cfg.labeler.judge.max_tokens, cfg.labeler.judge.cache_path)
        index = index_pool(args.input, limit=cfg.data.limit)  # every row's id: the summary checks each comes out once
        write_training_rows(cfg, label_plan(cfg, coordinator, index), run.dir / "labelled")
        snapshot = run.stop_coordinator()
        return run.write_summary(summarize_labels(run, args, index, snapshot), "label_summary.json")


def label_plan(cfg: Config, coordinator, index: PoolIndex):
    """read -> prepare_rows (checks; not selected = not judged) -> Label (actor pool) -> training rows (Arrow)."""
    p = cfg.pipeline
    stage = StageSpec("label", LabelStage, dict(labeler_cls=labeler_class(cfg.labeler.kind),
                                                labeler_config=cfg.labeler.judge, coordinator=coordinator),
                      batch_size=p.label_batch_size, num_cpus=p.label_num_cpus, num_gpus=p.label_num_gpus,
                      actors=(1, p.label_actors), remote_args=actor_fault_args(cfg))
    retry = task_fault_args(cfg)
    ds = read_pool_rows(index, num_cpus=p.map_num_cpus, columns=INPUT_COLUMNS, max_retries=p.map_max_retries)
    ds = ds.map_batches(prepare_rows, fn_kwargs={"sep": cfg.model.sep}, batch_format="numpy",
                        num_cpus=p.map_num_cpus, **retry)
    return stage.apply(ds).map_batches(to_training_rows, batch_format="numpy", num_cpus=p.map_num_cpus, **retry)


def write_training_rows(cfg: Config, ds, folder: Path) -> None:
    """The labelled set as folder/*.parquet, in place of any earlier one."""
    for old in folder.glob("*.parquet") if folder.exists() else []:
        old.unlink()  # a rerun rewrites the whole set (from the cache), never appends duplicates
    ds.write_parquet(str(folder), ray_remote_args={"num_cpus": cfg.pipeline.map_num_cpus, **task_fault_args(cfg)})


def summarize_labels(run: Run, args: LabelArgs, index: PoolIndex, snapshot: dict) -> dict:
    """Counts over the written rows: statuses, invalid reasons, cache hits, judge tokens, the budget."""
    from actprm_ray.pipeline.coordinator import judge_counters

    t = pads.dataset(str(run.dir / "labelled"), format="parquet").to_table(
        columns=["id", "label_status", "label_reason", "label_cache_hit", "judge_prompt_tokens",
                 "judge_tokens"]).to_pylist()
    status = {s: sum(1 for r in t if r["label_status"] == s) for s in STATUSES}
    paid = sum(1 for r in t if r["judge_tokens"] > 0)
    invalid = Counter(reason_kind(r["label_reason"]) for r in t if r["label_status"] == INVALID_INPUT)
    return {
        "input": args.input, "output": str(run.dir), "rows_read": len(index.ids), "rows": len(t), "status": status,
        # Every row read comes out exactly once, with one status.
        "identity_holds": sorted(r["id"] for r in t) == sorted(index.ids) and sum(status.values()) == len(t),
        "invalid_reasons": dict(invalid.most_common()),
        "cache_hits": sum(1 for r in t if r["label_cache_hit"]),
        "judge_prompt_tokens": sum(r["judge_prompt_tokens"] for r in t),
        "judge_generated_tokens": sum(r["judge_tokens"] for r in t),
        "failure_rate": status["failed"] / max(1, status["ok"] + status["failed"]),
        "cost_model_tokens_N_times_C": (status["ok"] + status["failed"]) * TOKENS_PER_CRITIQUE,
        "rows_paid_this_run": paid, "budget": snapshot["budget"], "judge": judge_counters(snapshot),
        "wall_time_s": run.wall_s,
    }


def parse_label_args(argv: list[str]) -> tuple[LabelArgs, Config]:
    """`--input PATH --output DIR [--config FILE] [a.b=c ...]` (labeler.*, budget.*, pipeline.* overrides)."""
    p = job_parser("jobs/label.py", "Judge a selected set into labelled training rows (cache-backed).")
    p.add_argument("--input", required=True, help="Parquet/JSONL rows with id, question, steps (e.g. filter retained/)")
    p.add_argument("--output", required=True, help="output folder: labelled/*.parquet + label_summary.json")
    known, cfg = parse_job_args(p, argv)
    return LabelArgs(input=known.input, output=known.output), cfg
