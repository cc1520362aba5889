"""Scoring a benchmark's rows with a pluggable scorer, and the padding arithmetic of the eval report.

A scorer is called once per benchmark with the rows that pass the canonical format:

    scorer(rows, *, batch_size, max_tokens, progress) -> Scored

where each row is {"id", "question", "steps"}. It tokenises each row once, reports rows over `max_tokens` as
unscored (with token_limit_reason), scores the rest with the one scoring function (model/scoring.score_encoded,
which alone decides the length order of the forward batches), and says which batches it ran, so the report's
padding is what the model saw. It may call progress(rows) after each batch, and has a `sep` attribute (the
separator it will use). The in-process scorer (scorers.py) and the Ray one (ray_scorer.py) fit this shape.

Padding fraction = padded slots / all slots in the batches, where a batch of lengths L occupies len(L)·max(L)
slots. `score_rows` reports it for batches cut in input order ("before" bucketing) and for the batches the
scorer ran, length-sorted ("after").
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from actprm_ray.data.step_format import DEFAULT_SEP, StepFormatError, canonicalize

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """A scorer's answer for a list of rows; indices are positions in that list."""

    mus: list[list[float] | None]  # µ per step; None = not scored, `reasons` says why
    reasons: dict[int, str]  # why a row was not scored (e.g. token_limit_reason)
    lengths: list[int]  # tokens the model reads, per row
    batches: list[list[int]]  # the forward batches it ran (padding report)


class Scorer(Protocol):
    def __call__(self, rows: list[dict], *, batch_size: int, max_tokens: int | None,
                 progress: Callable[[int], None] | None = None) -> Scored: ...


def token_limit_reason(tokens: int, max_tokens: int | None) -> str:
    """"" if a row of `tokens` tokens may be scored, else why not. Evaluation never truncates, and attention over
    a corrupt megabyte-long row would run for hours or exhaust memory."""
    return "" if max_tokens is None or tokens <= max_tokens else f"{tokens} tokens exceed max_tokens={max_tokens}"


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


@dataclass
class ScoreResult:
    mus: list[list[float] | None]  # per input row; None for a row not scored (listed in unscorable)
    unscorable: list[dict] = field(default_factory=list)  # {"id", "reason"}
    padding_before: dict = field(default_factory=dict)
    padding_after: dict = field(default_factory=dict)
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
            "padding_length_unit": "tokens",
            "padding_fraction_before_bucketing": self.padding_before.get("fraction"),
            "padding_fraction_after_bucketing": self.padding_after.get("fraction"),
            "padding_before": self.padding_before,
            "padding_after": self.padding_after,
            "unscorable": len(self.unscorable),
            "unscorable_rows": self.unscorable,
        }


class _ProgressLog:
    """progress(rows) for a scorer: logs rows done and the rate at most every `every_s` seconds."""

    def __init__(self, total: int, every_s: float):
        self.total, self.every_s, self.done = total, every_s, 0
        self.start = self.last = time.perf_counter()

    def __call__(self, rows: int) -> None:
        self.done += rows
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            log.info("scored %d/%d rows (%.1f rows/s)", self.done, self.total, self.done / (now - self.start))


def _check_output(rows: list[dict], out: Scored) -> None:
    """A scorer that returns the wrong shape or non-finite µ is a bug, not a data problem: fail loudly."""
    if not len(out.mus) == len(out.lengths) == len(rows):
        raise RuntimeError(f"scorer returned {len(out.mus)} rows ({len(out.lengths)} lengths) for {len(rows)}")
    for j, (row, mus) in enumerate(zip(rows, out.mus)):
        if mus is None:
            if not out.reasons.get(j):
                raise RuntimeError(f"scorer left row {row['id']} unscored without a reason")
            continue
        if len(mus) != len(row["steps"]):
            raise RuntimeError(f"scorer returned {len(mus)} scores for {len(row['steps'])} steps (row {row['id']})")
        if not all(math.isfinite(m) for m in mus):
            raise RuntimeError(f"scorer returned a non-finite score for row {row['id']}")


def score_rows(rows: list[dict], scorer: Scorer, batch_size: int = 16, *, progress_every_s: float = 30.0,
               max_tokens: int | None = None) -> ScoreResult:
    """Score every row with `scorer`; results come back in input order.

    Rows the canonical step format rejects (e.g. an empty step) are skipped and listed in `unscorable`,
    never a crash; the scorer's `sep` decides what counts as a literal separator. So are rows the scorer does
    not score (longer than `max_tokens`), with its reason.
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
    start = time.perf_counter()  # the scorer tokenises: that is part of the cost of scoring
    out = scorer(good, batch_size=batch_size, max_tokens=max_tokens,
                 progress=_ProgressLog(len(good), progress_every_s))
    result.wall_s = time.perf_counter() - start
    _check_output(good, out)
    result.unscorable += [{"id": good[j]["id"], "reason": out.reasons[j]} for j in sorted(out.reasons)]
    scored = [j for j, mus in enumerate(out.mus) if mus is not None]
    for j in scored:
        result.mus[ok[j]] = [float(m) for m in out.mus[j]]
    result.padding_before = padding_stats([out.lengths[j] for j in scored], sequential_batches(len(scored), batch_size))
    result.padding_after = padding_stats(out.lengths, out.batches)
    result.rows, result.batches = len(scored), len(out.batches)
    result.steps = sum(len(good[j]["steps"]) for j in scored)
    return result
