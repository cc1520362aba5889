"""The generate job's output directory: problems cut into shards, one Parquet file per finished shard, and a
completion record per shard that makes a rerun skip what is done.

    <out_dir>/shard-00000.parquet        the rollouts of shard 0 (rollouts.ROLLOUT_COLUMNS): the folder is a pool
    <out_dir>/_shards/shard-00000.json   its completion record: counts, and the fingerprint of what was generated
    <out_dir>/_config.yaml, _summary.json

Names that start with "_" keep the bookkeeping out of every reader of the folder (data/shards.list_shards and
pyarrow datasets skip them). A shard is finished when its record and its file both exist. Both are written
atomically (a hidden temp file, then os.replace), the file first and the record last, so an interrupted run
leaves each shard either finished or absent, and the next run generates the absent ones whole: no problem is
generated twice, none is lost.

A record with another fingerprint (other problems in the shard: another limit, shard_size or problems file;
other sampling settings; another policy or system prompt) is an error, not a silent regeneration: one folder
holds one setting. So is a shard beyond this run's plan. Choose another generate.out_dir for another setting.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from actprm_ray.data.step_format import StepFormatError, check_text
from actprm_ray.generate.rollouts import rollout_schema

RECORDS = "_shards"
SHARD_NAME = re.compile(r"shard-(\d{5})\.(parquet|json)")
# The per-shard counts; the job's summary sums them over every shard of the plan.
COUNTS = ("problems", "completions", "rows", "empty_completions", "unreadable_completions", "prompt_too_long",
          "cut_at_max_tokens", "generated_tokens")


class ShardMismatch(RuntimeError):
    """The output folder holds shards of another setting (see the module docstring)."""


@dataclass
class Shard:
    index: int
    problems: list[dict]  # [{problem_id, question}], in file order
    fingerprint: str = ""
    name: str = field(init=False)

    def __post_init__(self):
        self.name = f"shard-{self.index:05d}"


def plan_shards(problems: list[dict], shard_size: int, settings: dict) -> list[Shard]:
    """Consecutive runs of `shard_size` problems; each shard's fingerprint covers its problems and `settings`
    (everything that changes what the policy writes)."""
    shards = []
    for index, start in enumerate(range(0, len(problems), shard_size)):
        chunk = problems[start:start + shard_size]
        h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for p in chunk:
            h.update(f"{p['problem_id']}\t{p['question']}\n".encode())
        shards.append(Shard(index, chunk, h.hexdigest()[:16]))
    return shards


def shard_file(out_dir: Path, shard: Shard) -> Path:
    return out_dir / f"{shard.name}.parquet"


def record_file(out_dir: Path, shard: Shard) -> Path:
    return out_dir / RECORDS / f"{shard.name}.json"


def finished_records(out_dir: Path, shards: list[Shard]) -> dict[int, dict]:
    """{shard index: completion record} of the finished shards; raises ShardMismatch on another setting's."""
    stray = sorted(p.name for folder in (out_dir, out_dir / RECORDS) if folder.is_dir() for p in folder.iterdir()
                   if (m := SHARD_NAME.fullmatch(p.name)) and int(m.group(1)) >= len(shards))
    if stray:
        raise ShardMismatch(f"{out_dir} holds shards beyond this run's {len(shards)}: {', '.join(stray[:5])}; "
                            "it was written with more problems or a smaller generate.shard_size")
    done = {}
    for shard in shards:
        path = record_file(out_dir, shard)
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        if record["fingerprint"] != shard.fingerprint:
            raise ShardMismatch(f"{path} was generated with other problems or settings than this run's "
                                f"{shard.name} (fingerprint {record['fingerprint']} != {shard.fingerprint})")
        if shard_file(out_dir, shard).exists():
            done[shard.index] = record
    return done


def write_shard(out_dir: Path, shard: Shard, results: list[dict], prompt_too_long: int) -> dict:
    """Write one finished shard: its rollouts (in problem order) as Parquet, then its record.

    `results` are the shard's pool rows, one per completion. Counted but not written: an empty completion
    (steps == []: a pool row needs a step) and an unreadable one (a NUL or an unpaired surrogate in its text,
    which the pool reader, data/shards.py, would reject: a random policy writes such bytes). Returns the record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    order = {p["problem_id"]: i for i, p in enumerate(shard.problems)}
    results = sorted(results, key=lambda r: (order[r["problem_id"]], r["sample_index"]))
    nonempty = [r for r in results if r["steps"]]
    rows = [r for r in nonempty if readable(r)]
    record = {"shard": shard.index, "fingerprint": shard.fingerprint, "problems": len(shard.problems),
              "first_problem_id": shard.problems[0]["problem_id"], "last_problem_id": shard.problems[-1]["problem_id"],
              "completions": len(results), "rows": len(rows), "empty_completions": len(results) - len(nonempty),
              "unreadable_completions": len(nonempty) - len(rows),
              "prompt_too_long": prompt_too_long,
              "cut_at_max_tokens": sum(r["finish_reason"] == "length" for r in results),
              "generated_tokens": sum(r["policy_tokens"] for r in results)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RECORDS).mkdir(exist_ok=True)
    table = pa.Table.from_pylist([{k: r[k] for k in rollout_schema().names} for r in rows], schema=rollout_schema())
    _atomic(shard_file(out_dir, shard), out_dir, lambda tmp: pq.write_table(table, tmp))
    _atomic(record_file(out_dir, shard), out_dir, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
    return record


def readable(row: dict) -> bool:
    """Can the pool reader hold this row's text (data/step_format.check_text on the question and every step)?"""
    try:
        for text in (row["question"], *row["steps"]):
            check_text(text, "text")
    except StepFormatError:
        return False
    return True


def _atomic(path: Path, out_dir: Path, write) -> None:
    """write(tmp) then rename over `path`: a reader, or a rerun after a crash, sees the whole file or none."""
    tmp = out_dir / RECORDS / f".{path.name}.{os.getpid()}.tmp"  # hidden from readers, on the same file system
    write(tmp)
    os.replace(tmp, path)


def totals(records: list[dict]) -> dict:
    """The per-shard counts summed over `records`."""
    return {k: sum(r.get(k, 0) for r in records) for k in COUNTS}
