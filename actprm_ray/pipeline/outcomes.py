"""Row accounting: every row read ends in exactly one outcome, and the counts add up to the rows read."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

INVALID_INPUT, CONFIDENT, LABEL_FAILED, TRAINED, NOT_REACHED = (
    "invalid_input", "confident", "label_failed", "trained", "not_reached")
OUTCOMES = (INVALID_INPUT, CONFIDENT, LABEL_FAILED, TRAINED, NOT_REACHED)

OUTCOME_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("outcome", pa.string()),
    ("reason", pa.string()),
    ("model_version", pa.int64()),  # version that scored the row (-1: not scored)
    ("train_version", pa.int64()),  # trainer version when the row was consumed (-1: never consumed)
    ("label_source", pa.string()),
    ("label_cache_hit", pa.bool_()),
    ("judge_prompt_tokens", pa.int64()),
    ("judge_tokens", pa.int64()),
    ("pseudo_label_correct", pa.int8()),  # confident rows with a known label: 1/0; otherwise -1
    ("label_key", pa.string()),  # the granted label's key ("" if none): the budget's stop rule reads it back
    ("audited", pa.bool_()),  # a trusted row labelled anyway (selection.audit_rate, or the controller's guard)
    ("audit_correct", pa.int8()),  # audited rows with a judge label: pseudo-label == judge label 1/0; otherwise -1
])


def outcome_row(row_id, outcome, reason="", *, model_version=-1, train_version=-1, label_source="",
                label_cache_hit=False, judge_prompt_tokens=0, judge_tokens=0, pseudo_label_correct=-1,
                label_key="", audited=False, audit_correct=-1) -> dict:
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}")
    return dict(id=str(row_id), outcome=outcome, reason=reason, model_version=int(model_version),
                train_version=int(train_version), label_source=label_source, label_cache_hit=bool(label_cache_hit),
                judge_prompt_tokens=int(judge_prompt_tokens), judge_tokens=int(judge_tokens),
                pseudo_label_correct=int(pseudo_label_correct), label_key=str(label_key), audited=bool(audited),
                audit_correct=int(audit_correct))


def write_outcome_part(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTCOME_SCHEMA), tmp)
    tmp.rename(path)  # atomic: a crash never leaves half a part


# The trainer flushes its outcomes as part of each checkpoint: rank{r}-flush{F:06d}-{ns}.parquet (train/loop.py).
TRAINER_PART = re.compile(r"rank(\d+)-flush(\d+)-")
UNCOMMITTED = "outcomes_uncommitted"


def committed_flushes(ray_train_dir: Path, run_name: str) -> int:
    """How many trainer flushes the checkpoint Ray Train restores from covers (0 when it restores none).

    Ray registers a checkpoint after its upload, asynchronously: a driver killed in between leaves a checkpoint
    directory and its outcome part on storage, yet the rerun starts from the checkpoint before. Asking Ray which
    checkpoint it will restore (`Result.from_path`) keeps the outcomes and the model in step."""
    from ray.train import Result

    path = Path(ray_train_dir) / run_name
    if not path.is_dir():
        return 0
    try:
        checkpoint = Result.from_path(str(path)).checkpoint
    except RuntimeError:  # no checkpoint manager snapshot: nothing was ever registered
        return 0
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        return int(json.loads((Path(d) / "trainer_state.json").read_text()).get("flushes", 0))


def quarantine_uncommitted(directory: Path, committed: int) -> list[str]:
    """Move trainer parts from flush `committed` on (a checkpoint that never committed) out of the outcome table.

    Their rows were trained into weights that are gone, so they must be trained again: they are re-delivered, and
    their labels come back from the ledger for free. The parts are kept beside the table for the record."""
    directory, moved = Path(directory), []
    for part in sorted(directory.glob("*.parquet")) if directory.is_dir() else []:
        m = TRAINER_PART.match(part.name)
        if m and int(m.group(2)) >= committed:
            dest = directory.parent / UNCOMMITTED / part.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            part.rename(dest)
            moved.append(part.name)
    return moved


def read_outcome_parts(directory: Path) -> pa.Table:
    parts = sorted(Path(directory).glob("*.parquet")) if Path(directory).is_dir() else []
    if not parts:
        return OUTCOME_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p, schema=OUTCOME_SCHEMA) for p in parts])


def finalize(recorded: pa.Table, pool_ids: list[str]) -> tuple[pa.Table, dict]:
    """Add `not_reached` for pool rows without an outcome; check the identity. Returns (table, counts)."""
    ids = recorded.column("id").to_pylist()
    dupes = [i for i, c in Counter(ids).items() if c > 1]
    if dupes:
        raise AssertionError(f"{len(dupes)} rows have more than one outcome, e.g. {dupes[:5]}")
    seen = set(ids)
    missing = [outcome_row(i, NOT_REACHED, "not labelled or trained: the run stopped first (label budget, or end of run); a rerun picks it up")
               for i in pool_ids if i not in seen]
    table = pa.concat_tables([recorded, pa.Table.from_pylist(missing, schema=OUTCOME_SCHEMA)])
    unknown = seen - set(pool_ids)
    if unknown:
        raise AssertionError(f"{len(unknown)} outcomes for ids not in the pool, e.g. {sorted(unknown)[:5]}")
    counts = Counter(table.column("outcome").to_pylist())
    counts = {o: counts.get(o, 0) for o in OUTCOMES}
    assert sum(counts.values()) == len(pool_ids), (counts, len(pool_ids))
    return table, counts
