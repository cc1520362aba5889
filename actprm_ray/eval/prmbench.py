"""PRMBench loader (METHOD §9), following the official loader's rules.

- Read `prmtest_classified/*.jsonl` only (no recursion: the subset400 folder is a dev copy, not more data).
- Deduplicate on (classification, idx), keeping the first occurrence in sorted-file, line order (6,216 -> 6,211;
  the five duplicates are multi_solutions rows with different processes, and first-kept is what the official
  loader does and what gives METHOD's 94,203 steps).
- Evaluate `modified_question` + `modified_process`; each `redundency` row also adds its `original_question` +
  `original_process` as an error-free sample in category "correct" (+758 -> 6,969 samples, 94,203 steps).
- Strip a leading "Step k." / "k." from each step (the canonical format applies afterwards, in the scorer).
- `error_steps` are 1-based; entries outside 1..len(steps) are dropped and counted (151 in 100 rows).
"""

from __future__ import annotations

import re
from pathlib import Path

from actprm_ray.config import shared_data_dir
from actprm_ray.eval.samples import (
    EvalDataError,
    EvalSample,
    LoadResult,
    evenly_spaced,
    is_int,
    read_jsonl,
    require_fields,
    string_steps,
)
from actprm_ray.eval.metrics import CORRECT_CATEGORY

REQUIRED_FIELDS = ("idx", "classification", "modified_question", "modified_process", "error_steps")
EXTRA_CORRECT_FROM = "redundency"  # the official loader's spelling
EXTRA_FIELDS = ("original_question", "original_process")

# "Step 3." / "Step 3:" / "step 3 ." or "3." followed by whitespace. The whitespace requirement keeps numbers
# such as "57.0" or "2.5 hours" intact; a step that is only a prefix ("64.") is left alone.
_STEP_PREFIX = re.compile(r"^\s*(?:step\s*\d+\s*[.:]|\d+\.(?=\s))\s*", re.IGNORECASE)


def strip_step_prefix(step: str) -> str:
    """Remove a leading "Step k." / "Step k:" / "k." numbering; keep the step unchanged if nothing would be left."""
    stripped = _STEP_PREFIX.sub("", step, count=1)
    return stripped if stripped.strip() else step


def default_prmbench_dir() -> Path:
    return shared_data_dir() / "prmbench" / "prmtest_classified"


def _clean_error_steps(error_steps: object, num_steps: int) -> tuple[list[int] | None, int, str | None]:
    """(in-range 1-based steps, number dropped as out of range, reason if the field is unusable)."""
    if not isinstance(error_steps, list) or not all(is_int(j) for j in error_steps):
        return None, 0, f"error_steps must be a list of ints, got {error_steps!r}"
    kept = [j for j in error_steps if 1 <= j <= num_steps]
    return kept, len(error_steps) - len(kept), None


def load_prmbench(root: str | Path | None = None, limit: int | None = None) -> LoadResult:
    """All PRMBench samples from `root` (the prmtest_classified folder); `limit` keeps N per category, evenly spread."""
    root = Path(root) if root is not None else default_prmbench_dir()
    if not root.is_dir():
        raise EvalDataError(f"PRMBench: directory not found: {root}")
    files = sorted(p for p in root.glob("*.jsonl") if p.is_file())
    if not files:
        raise EvalDataError(f"PRMBench: no *.jsonl files in {root}")
    result = LoadResult(samples=[])
    seen: set[tuple[str, str]] = set()
    by_cat: dict[str, list[EvalSample]] = {}
    raw = duplicates = oor_entries = prefixes = 0
    oor_rows: set[tuple[str, str]] = set()

    def add(cat: str, sid: str, question: object, steps: object, error_steps: list[int], source: str) -> None:
        nonlocal prefixes
        reason = string_steps(steps) or (None if isinstance(question, str) else "question must be a string")
        if reason:
            result.skip(source, reason, sid)
            return
        clean = [strip_step_prefix(s) for s in steps]
        prefixes += sum(a != b for a, b in zip(clean, steps))
        by_cat.setdefault(cat, []).append(EvalSample(id=sid, subset=cat, question=question, steps=clean, error_steps=error_steps))

    for path in files:
        for source, row in read_jsonl(path, result):
            raw += 1
            require_fields(row, REQUIRED_FIELDS, source)
            cat, idx = str(row["classification"]), str(row["idx"])
            if (cat, idx) in seen:
                duplicates += 1
                continue
            seen.add((cat, idx))
            if cat == EXTRA_CORRECT_FROM and (CORRECT_CATEGORY, idx) not in seen:
                require_fields(row, EXTRA_FIELDS, source)
                seen.add((CORRECT_CATEGORY, idx))
                add(CORRECT_CATEGORY, f"{CORRECT_CATEGORY}_{idx}", row["original_question"], row["original_process"], [], source)
            steps = row["modified_process"]
            num_steps = len(steps) if isinstance(steps, list) else 0
            kept, dropped, reason = _clean_error_steps(row["error_steps"], num_steps)
            if reason:
                result.skip(source, reason, idx)
                continue
            if dropped:
                oor_entries += dropped
                oor_rows.add((cat, idx))
            add(cat, f"{cat}_{idx}", row["modified_question"], steps, kept, source)

    for cat in sorted(by_cat):
        result.samples += evenly_spaced(by_cat[cat], limit)
    result.stats = {
        "files": len(files),
        "raw_rows": raw,
        "duplicates_dropped": duplicates,
        "unique_rows": raw - duplicates,
        "extra_correct": len(by_cat.get(CORRECT_CATEGORY, [])),
        "samples": len(result.samples),
        "steps": sum(len(s.steps) for s in result.samples),
        "per_category": {c: sum(s.subset == c for s in result.samples) for c in sorted(by_cat)},
        "out_of_range_error_steps": oor_entries,
        "rows_with_out_of_range": len(oor_rows),
        "step_prefixes_stripped": prefixes,
        "skipped": len(result.skipped),
    }
    return result
