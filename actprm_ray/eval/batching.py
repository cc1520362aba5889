"""Length-bucketed scoring with a pluggable scorer, and the padding arithmetic behind it.

A scorer is any callable `scorer(rows) -> per-row list of per-step µ`, where each row is
{"id", "question", "steps"}. It may also offer `lengths(rows) -> list[int]` (token counts) and a `sep`
attribute (the separator it will use); without `lengths`, character counts stand in for token counts.
A scorer with `whole_dataset = True` gets all rows in one call, in bucketed order (ray_scorer.py).
The local scorers (scorers.py, qwen_prm.py) and a Ray Data scorer stage all fit this shape.

Padding fraction = padded slots / all slots in the batches, where a batch of lengths L occupies len(L)·max(L)
slots. Sorting by length before cutting batches puts similar lengths together; `score_rows` reports the
fraction for the input order ("before") and for the order it actually used ("after").
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from actprm_ray.data.step_format import DEFAULT_SEP, StepFormatError, canonicalize

log = logging.getLogger(__name__)

Scorer = Callable[[list[dict]], list[list[float]]]


def padding_stats(lengths: list[int], batches: list[list[int]]) -> dict:
    """{"padded", "total", "fraction"} for `batches` (lists of indices into `lengths`)."""
    padded = total = 0
    for batch in batches:
        if not batch:
            continue
        width = max(lengths[i] for i in batch)
        total += width * len(batch)
        padded += sum(width - lengths[i] for i in batch)
    return {"padded": padded, "total": total, "fraction": padded / total if total else 0.0}


def sequential_batches(n: int, batch_size: int) -> list[list[int]]:
    """Indices 0..n-1 cut into consecutive batches (the unbucketed baseline)."""
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches of indices in descending length order: least padding, and the largest batch runs first so an
    out-of-memory batch fails at once rather than at the end of a long run."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


@dataclass
class ScoreResult:
    mus: list[list[float] | None]  # per input row; None for a row the canonical format rejects
    unscorable: list[dict] = field(default_factory=list)  # {"id", "reason"}
    padding_before: dict = field(default_factory=dict)
    padding_after: dict = field(default_factory=dict)
    length_unit: str = "tokens"
    wall_s: float = 0.0
    rows: int = 0
    steps: int = 0
    batches: int = 0

    def summary(self) -> dict:
        return {
            "rows_scored": self.rows,
            "steps_scored": self.steps,
            "batches": self.batches,
            "wall_s": round(self.wall_s, 3),
            "rows_per_s": self.rows / self.wall_s if self.wall_s else None,
            "steps_per_s": self.steps / self.wall_s if self.wall_s else None,
            "padding_length_unit": self.length_unit,
            "padding_fraction_before_bucketing": self.padding_before.get("fraction"),
            "padding_fraction_after_bucketing": self.padding_after.get("fraction"),
            "padding_before": self.padding_before,
            "padding_after": self.padding_after,
            "unscorable": len(self.unscorable),
            "unscorable_rows": self.unscorable,
        }


def _check_output(rows: list[dict], out: list[list[float]]) -> None:
    """A scorer that returns the wrong shape or non-finite µ is a bug, not a data problem: fail loudly."""
    if len(out) != len(rows):
        raise RuntimeError(f"scorer returned {len(out)} rows for {len(rows)}")
    for row, mus in zip(rows, out):
        if len(mus) != len(row["steps"]):
            raise RuntimeError(f"scorer returned {len(mus)} scores for {len(row['steps'])} steps (row {row['id']})")
        if not all(math.isfinite(m) for m in mus):
            raise RuntimeError(f"scorer returned a non-finite score for row {row['id']}")


def score_rows(rows: list[dict], scorer: Scorer, batch_size: int = 16, *, bucket: bool = True,
               progress_every_s: float = 30.0, max_tokens: int | None = None) -> ScoreResult:
    """Score every row with `scorer` in length-sorted batches; results come back in input order.

    Rows the canonical step format rejects (e.g. an empty step) are skipped and listed in `unscorable`,
    never a crash; the scorer's `sep` decides what counts as a literal separator. So are rows longer than
    `max_tokens` (scorers that report token lengths): evaluation never truncates, and attention over a corrupt
    megabyte-long row would run for hours or exhaust memory.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sep = getattr(scorer, "sep", DEFAULT_SEP)
    result = ScoreResult(mus=[None] * len(rows))
    ok: list[int] = []
    for i, row in enumerate(rows):
        try:
            canonicalize(row["question"], row["steps"], sep)
            ok.append(i)
        except StepFormatError as e:
            result.unscorable.append({"id": row["id"], "reason": str(e)})
    good = [rows[i] for i in ok]
    # The clock starts before `lengths`: tokenisation is part of the cost of scoring.
    start = last_log = time.perf_counter()
    if hasattr(scorer, "lengths"):
        lengths = list(scorer.lengths(good))
    else:
        result.length_unit = "chars"
        lengths = [len(r["question"]) + sum(len(s) for s in r["steps"]) for r in good]
    if max_tokens is not None and result.length_unit == "tokens":
        keep = [j for j, n in enumerate(lengths) if n <= max_tokens]
        result.unscorable += [{"id": good[j]["id"], "reason": f"{n} tokens exceed max_tokens={max_tokens}"}
                              for j, n in enumerate(lengths) if n > max_tokens]
        ok, good, lengths = [ok[j] for j in keep], [good[j] for j in keep], [lengths[j] for j in keep]
    result.padding_before = padding_stats(lengths, sequential_batches(len(good), batch_size))
    batches = length_sorted_batches(lengths, batch_size) if bucket else sequential_batches(len(good), batch_size)
    result.padding_after = padding_stats(lengths, batches)

    done = 0
    if getattr(scorer, "whole_dataset", False):
        # A distributed scorer (e.g. the Ray Data one) takes every row at once, already in bucketed order,
        # and cuts its own batches from that order.
        batches_to_run = [[j for b in batches for j in b]]
    else:
        batches_to_run = batches
    for batch in batches_to_run:
        batch_rows = [good[j] for j in batch]
        out = scorer(batch_rows)
        _check_output(batch_rows, out)
        for j, mus in zip(batch, out):
            result.mus[ok[j]] = [float(m) for m in mus]
        done += len(batch)
        result.steps += sum(len(r["steps"]) for r in batch_rows)
        now = time.perf_counter()
        if now - last_log >= progress_every_s:
            last_log = now
            log.info("scored %d/%d rows (%.1f rows/s)", done, len(good), done / (now - start))
    result.wall_s = time.perf_counter() - start
    result.rows, result.batches = done, len(batches)
    return result
