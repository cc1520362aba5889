"""What every benchmark loader returns: evaluation samples plus a record of what was skipped and why.

Error policy shared by all loaders:
- a missing file, or a row without a required field, raises EvalDataError naming the file, line and field
  (the data or the path is wrong; guessing would give a silently different benchmark);
- a row whose value is unusable (a label out of range, a wrong type, bad JSON) is reported in `skipped`
  with its source and reason, and the rest of the benchmark still evaluates.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


class EvalDataError(ValueError):
    """A benchmark file or a required field is missing; the message names it."""


@dataclass
class EvalSample:
    id: str
    subset: str  # ProcessBench subset, PRMBench category, or first-error source
    question: str
    steps: list[str]
    label: int | None = None  # first-error protocol: 0-based index of the first wrong step, -1 = all correct
    error_steps: list[int] | None = None  # PRMBench: 1-based gold error steps, out-of-range ones already removed


@dataclass
class LoadResult:
    samples: list[EvalSample]
    skipped: list[dict] = field(default_factory=list)  # {"source": "file:line", "id": ..., "reason": ...}
    stats: dict = field(default_factory=dict)

    def skip(self, source: str, reason: str, row_id: object = None) -> None:
        self.skipped.append({"source": source, "id": None if row_id is None else str(row_id), "reason": reason})


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise EvalDataError(f"{what}: file not found: {path}")
    return path


def read_jsonl(path: Path, result: LoadResult) -> Iterator[tuple[str, dict]]:
    """Yield (source "name:line", row) for each non-blank line; undecodable lines go to result.skipped.

    Read as bytes and decoded line by line: one line that is not UTF-8 is one skipped row, not a failed file."""
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            source = f"{path.name}:{line_no}"
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                result.skip(source, f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            except json.JSONDecodeError as e:
                result.skip(source, f"invalid JSON: {e}")
                continue
            if not isinstance(row, dict):
                result.skip(source, f"row is a {type(row).__name__}, not an object")
                continue
            yield source, row


def evenly_spaced(items: list, limit: int | None) -> list:
    """`limit` items spread evenly over `items` (indices i·n//limit), in order; all of them when limit is None.

    A spread, not a head: ProcessBench lists all erroneous rows before the correct ones, so the first N rows of
    a subset would have no correct row at all and F1 would be 0 by construction.
    """
    if limit is None or limit >= len(items):
        return list(items)
    if limit <= 0:
        return []
    n = len(items)
    return [items[(i * n) // limit] for i in range(limit)]


def stratified_spread(items: list, limit: int | None, key) -> list:
    """`limit` items with each stratum (items sharing `key(item)`) represented in proportion, at least one
    per stratum when `limit` allows, each evenly spread within its stratum; original order is kept.

    First-error files mix correct and erroneous rows unevenly (ProcessBench puts most erroneous rows first),
    so a plain spread can still miss all correct rows and make F1 0 by construction.
    """
    if limit is None or limit >= len(items):
        return list(items)
    if limit <= 0:
        return []
    strata: dict[object, list[int]] = {}
    for i, item in enumerate(items):
        strata.setdefault(key(item), []).append(i)
    alloc = {k: max(1, round(limit * len(v) / len(items))) for k, v in strata.items()}
    while sum(alloc.values()) > limit:  # rounding or the at-least-one rule overshot: trim the largest
        alloc[max(alloc, key=alloc.get)] -= 1
    while sum(alloc.values()) < limit:  # undershot: grow the stratum with the most items left
        alloc[max(strata, key=lambda k: len(strata[k]) - alloc[k])] += 1
    chosen = sorted(i for k, idx in strata.items() for i in evenly_spaced(idx, alloc[k]))
    return [items[i] for i in chosen]


def require_fields(row: dict, fields: tuple[str, ...], source: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise EvalDataError(f"{source}: missing required field(s) {missing}")


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def string_steps(steps: object) -> str | None:
    """None if `steps` is a non-empty list of strings, else the reason it is not."""
    if not isinstance(steps, list):
        return f"steps must be a non-empty list, got {type(steps).__name__}"
    if not steps:
        return "steps is empty"
    bad = [i for i, s in enumerate(steps) if not isinstance(s, str)]
    return f"step(s) {bad} are not strings" if bad else None
