"""ProcessBench loader (METHOD §9): four subsets, 0-based earliest-error labels, -1 = all steps correct."""

from __future__ import annotations

from pathlib import Path

from actprm_ray.config import shared_data_dir
from actprm_ray.eval.samples import (
    EvalSample,
    LoadResult,
    is_int,
    read_jsonl,
    require_fields,
    require_file,
    stratified_spread,
    string_steps,
)

SUBSETS = ("gsm8k", "math", "olympiadbench", "omnimath")
REQUIRED_FIELDS = ("id", "problem", "steps", "label")  # `generator` and `final_answer_correct` are unused


def default_processbench_dir() -> Path:
    return shared_data_dir() / "processbench"


def check_first_error_label(label: object, num_steps: int) -> str | None:
    """None if `label` is a valid first-error index for `num_steps` steps (-1..num_steps-1), else the reason."""
    if not is_int(label):
        return f"label must be an int, got {type(label).__name__} {label!r}"
    if not -1 <= label < num_steps:
        return f"label {label} out of range for {num_steps} steps"
    return None


def load_processbench(
    root: str | Path | None = None, subsets: tuple[str, ...] = SUBSETS, limit: int | None = None
) -> LoadResult:
    """Read `<root>/<subset>.jsonl` for each subset; `limit` keeps N usable rows per subset (correct and
    erroneous rows in proportion, each evenly spread)."""
    root = Path(root) if root is not None else default_processbench_dir()
    result = LoadResult(samples=[])
    first_seen: dict[str, str] = {}  # id -> source of its first row: predictions and reasons are keyed by id
    for subset in subsets:
        path = require_file(root / f"{subset}.jsonl", f"ProcessBench subset {subset!r}")
        subset_samples = []
        for source, row in read_jsonl(path, result):
            require_fields(row, REQUIRED_FIELDS, source)
            row_id = str(row["id"])
            reason = string_steps(row["steps"]) or check_first_error_label(row["label"], len(row["steps"]))
            if not reason and row_id in first_seen:
                reason = f"duplicate id (first at {first_seen[row_id]})"
            if reason:
                result.skip(source, reason, row.get("id"))
                continue
            first_seen[row_id] = source
            subset_samples.append(
                EvalSample(id=row_id, subset=subset, question=row["problem"], steps=row["steps"], label=row["label"])
            )
        result.samples += stratified_spread(subset_samples, limit, key=lambda x: x.label == -1)
    result.stats = {
        "samples": len(result.samples),
        "steps": sum(len(s.steps) for s in result.samples),
        "per_subset": {s: sum(x.subset == s for x in result.samples) for s in subsets},
        "skipped": len(result.skipped),
    }
    return result
