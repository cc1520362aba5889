"""The labeler contract shared by the oracle, vLLM and HTTP judges.

A labeler is a Ray Data stage: `Labeler(config)` builds its engine once, `labeler(batch) -> batch` labels
the rows whose `selected` column is True and passes every other row through untouched, so one stream
carries all rows and accounting stays 1:1. Batches are Ray's numpy format: dict[str, np.ndarray], list
columns as object arrays.

Columns a labeler writes (one value per row, for every row):
    label_status         "ok" | "failed" | "skipped" (not selected) | "over_budget"
    label_reason         "" when ok, else a specific reason
    first_error_step     int; -1 = all correct; NO_LABEL when there is no label
    hard_labels          list[int] (METHOD §1); [] when there is no label
    label_source         "oracle" | "vllm:<judge>" | "http:<judge>" | "" ; cache hits keep the original source
    label_key            content hash (cache key) or ""
    label_cache_hit      bool
    judge_prompt_tokens  int, prompt tokens paid for this row (0 on a cache hit)
    judge_tokens         int, generated tokens paid for this row (0 on a cache hit)
    label_attempts       int, judge calls made for this row in this run
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Protocol

import numpy as np

from actprm_ray.data.step_format import StepFormatError, labels_from_first_error

NO_LABEL = -2
LABEL_COLUMNS = (
    "label_status",
    "label_reason",
    "first_error_step",
    "hard_labels",
    "label_source",
    "label_key",
    "label_cache_hit",
    "judge_prompt_tokens",
    "judge_tokens",
    "label_attempts",
)


class LabelBudget(Protocol):
    """Hard caps shared by every labeler replica (a Ray actor in a run, LocalBudget in tests)."""

    def reserve(self, n: int) -> int:
        """Ask for n labels; returns how many are granted (0..n). Granted labels count as used."""

    def spend_tokens(self, prompt_tokens: int, generated_tokens: int) -> None: ...

    def exhausted(self) -> bool: ...

    def add_counters(self, counters: dict[str, int]) -> None:
        """Labeler counters (judge requests, re-samples, HTTP retries and errors by kind) for the run summary."""


class LocalBudget:
    """In-process budget: max_labels / max_judge_tokens, None = unlimited."""

    def __init__(self, max_labels: int | None = None, max_judge_tokens: int | None = None):
        self.max_labels, self.max_judge_tokens = max_labels, max_judge_tokens
        self.labels = self.prompt_tokens = self.generated_tokens = 0
        self.counters: Counter = Counter()
        self._lock = threading.Lock()

    def reserve(self, n: int) -> int:
        with self._lock:
            if self.exhausted():
                return 0
            room = n if self.max_labels is None else max(0, min(n, self.max_labels - self.labels))
            self.labels += room
            return room

    def spend_tokens(self, prompt_tokens: int, generated_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += generated_tokens

    def add_counters(self, counters: dict[str, int]) -> None:
        with self._lock:
            self.counters.update(counters)

    def exhausted(self) -> bool:
        over_labels = self.max_labels is not None and self.labels >= self.max_labels
        over_tokens = self.max_judge_tokens is not None and self.generated_tokens >= self.max_judge_tokens
        return over_labels or over_tokens

    def state(self) -> dict:
        return dict(labels=self.labels, prompt_tokens=self.prompt_tokens, generated_tokens=self.generated_tokens,
                    max_labels=self.max_labels, max_judge_tokens=self.max_judge_tokens, exhausted=self.exhausted())


def empty_label_columns(n: int) -> dict[str, np.ndarray]:
    """Label columns for n rows, all 'skipped'. Labelers fill in the selected rows."""
    hard = np.empty(n, dtype=object)
    for i in range(n):
        hard[i] = []
    return {
        "label_status": np.array(["skipped"] * n, dtype=object),
        "label_reason": np.array([""] * n, dtype=object),
        "first_error_step": np.full(n, NO_LABEL, dtype=np.int64),
        "hard_labels": hard,
        "label_source": np.array([""] * n, dtype=object),
        "label_key": np.array([""] * n, dtype=object),
        "label_cache_hit": np.zeros(n, dtype=bool),
        "judge_prompt_tokens": np.zeros(n, dtype=np.int64),
        "judge_tokens": np.zeros(n, dtype=np.int64),
        "label_attempts": np.zeros(n, dtype=np.int64),
    }


class OracleLabeler:
    """Pool-based simulation (METHOD §8): reveals the pool's own `oracle_first_error_step` for selected rows.

    A reveal is free in tokens but still counts against the label budget, exactly like a judge call.
    """

    def __init__(self, config=None, budget: LabelBudget | None = None):
        self.budget = budget if budget is not None else LocalBudget()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        out = empty_label_columns(n)
        wanted = [i for i in range(n) if bool(batch["selected"][i])]
        granted = self.budget.reserve(len(wanted)) if wanted else 0
        for rank, i in enumerate(wanted):
            if rank >= granted:
                out["label_status"][i], out["label_reason"][i] = "over_budget", "label budget exhausted"
                continue
            k = int(batch["oracle_first_error_step"][i])
            num_steps = len(batch["steps"][i])
            if k == NO_LABEL:
                out["label_status"][i], out["label_reason"][i] = "failed", "row has no first_error_step to reveal"
                continue
            try:
                labels = labels_from_first_error(k, num_steps)
            except StepFormatError as e:
                out["label_status"][i], out["label_reason"][i] = "failed", f"oracle label invalid: {e}"
                continue
            out["label_status"][i], out["first_error_step"][i] = "ok", k
            out["hard_labels"][i], out["label_source"][i], out["label_attempts"][i] = labels, "oracle", 1
        return {**batch, **out}
