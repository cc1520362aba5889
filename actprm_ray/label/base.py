"""The labeler contract shared by the oracle, vLLM and HTTP judges.

A labeler is a Ray Data stage: `Labeler(config)` builds its engine once, `labeler(batch) -> batch` labels
the rows whose `selected` column is True and passes every other row through untouched, so one stream
carries all rows and accounting stays 1:1. Batches are Ray's numpy format: dict[str, np.ndarray], list
columns as object arrays.

Columns a labeler writes (one value per row, for every row):
    label_status         "ok" | "failed" (permanent) | "transient" (judge unreachable: not final, a rerun asks
                         again) | "skipped" (not selected) | "over_budget"
    label_reason         "" when ok, else a specific reason
    first_error_step     int; -1 = all correct; NO_LABEL when there is no label
    hard_labels          list[int] (METHOD §1); [] when there is no label
    label_source         "oracle" | "vllm:<judge>" | "http:<judge>" | "" ; cache hits keep the original source
    label_key            content hash (cache key; "oracle:<id>" for the oracle) or ""
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
    """Hard caps shared by every labeler replica (the run's coordinator actor in a run, LocalBudget in tests)."""

    def grant(self, keys: list[str], cached: list[bool]) -> list[bool]:
        """Ask for a label per key (cached: the label cache already holds it, so no judge request is needed).
        Returns one flag per key. Granting is idempotent: a key granted before is granted again at no cost
        (a re-run batch, a resume), so a fault never spends the budget twice."""

    def spend_tokens(self, key: str, prompt_tokens: int, generated_tokens: int) -> None:
        """One judge response for `key` arrived, costing these tokens."""

    def exhausted(self) -> bool: ...

    def add_counters(self, counters: dict[str, int]) -> None:
        """Labeler counters (judge requests, re-samples, HTTP retries and errors by kind) for the run summary."""


class GrantBook:
    """The budget's pure logic: which label keys are granted, what they cost, which reached the trainer.

    * `max_labels` caps the distinct keys granted over the run's lifetime (cache hits included: the label is
      used, though not paid again); a key granted once stays granted, so re-asking for it is free.
    * `max_judge_tokens` is enforced *before* a request is sent: a new uncached key is granted only if the tokens
      spent plus `tokens_per_request` (the judge's max_tokens) for every request still outstanding, this one
      included, fit under the cap. First attempts therefore never overshoot; re-samples of an unparseable
      critique (max_attempts > 1) are only started while the budget is not exhausted, so the overshoot is at most
      the re-samples in flight x max_tokens. With tokens_per_request = 0 (unknown), the cap is checked after
      the fact (overshoot: the requests in flight).
    * The run may stop once the budget is exhausted and every granted key has reached the trainer.
    """

    def __init__(self, max_labels: int | None = None, max_judge_tokens: int | None = None,
                 tokens_per_request: int = 0):
        self.max_labels, self.max_judge_tokens, self.tokens_per_request = max_labels, max_judge_tokens, tokens_per_request
        self.granted: dict[str, bool] = {}  # key -> served from the cache
        self.responded: set[str] = set()
        self.consumed: set[str] = set()
        self.outstanding = 0  # uncached grants still waiting for their first response
        self.prompt_tokens = self.generated_tokens = 0

    def restore(self, granted: dict[str, bool], spent: dict[str, tuple[int, int]], consumed: set[str]) -> None:
        """Rebuild from the ledger: grants, the tokens each granted key's responses cost, keys already final."""
        self.granted = dict(granted)
        self.responded = {k for k in spent if k in self.granted}
        self.prompt_tokens = sum(spent[k][0] for k in self.responded)
        self.generated_tokens = sum(spent[k][1] for k in self.responded)
        self.outstanding = 0  # a request outstanding at the crash either answered (in spent) or is re-asked
        self.consumed = set(consumed) & set(self.granted)

    def _room(self, cached: bool) -> bool:
        if self.max_labels is not None and len(self.granted) >= self.max_labels:
            return False
        if cached or self.max_judge_tokens is None:
            return True
        need = (self.outstanding + 1) * self.tokens_per_request
        return self.generated_tokens + need <= self.max_judge_tokens and self.generated_tokens < self.max_judge_tokens

    def grant(self, keys: list[str], cached: list[bool]) -> tuple[list[bool], list[tuple[str, bool]]]:
        """(flag per key, the newly granted (key, cached) pairs: what the caller must make durable)."""
        flags, new = [], []
        for key, hit in zip(keys, cached):
            if key in self.granted:
                flags.append(True)
            elif self._room(hit):
                self.granted[key] = hit
                self.outstanding += int(not hit)
                new.append((key, hit))
                flags.append(True)
            else:
                flags.append(False)
        return flags, new

    def spend_tokens(self, key: str, prompt_tokens: int, generated_tokens: int) -> None:
        if key in self.granted and not self.granted[key] and key not in self.responded:
            self.outstanding = max(0, self.outstanding - 1)
        self.responded.add(key)
        self.prompt_tokens += prompt_tokens
        self.generated_tokens += generated_tokens

    def exhausted(self) -> bool:
        over_labels = self.max_labels is not None and len(self.granted) >= self.max_labels
        over_tokens = (self.max_judge_tokens is not None
                       and self.generated_tokens + max(1, self.tokens_per_request) > self.max_judge_tokens)
        return over_labels or over_tokens

    def consume(self, keys: list[str]) -> None:
        self.consumed.update(k for k in keys if k in self.granted)

    def all_granted_consumed(self) -> bool:
        return self.exhausted() and len(self.consumed) >= len(self.granted)

    def state(self) -> dict:
        return dict(labels=len(self.granted), cached=sum(self.granted.values()), consumed=len(self.consumed),
                    prompt_tokens=self.prompt_tokens, generated_tokens=self.generated_tokens,
                    max_labels=self.max_labels, max_judge_tokens=self.max_judge_tokens, exhausted=self.exhausted())


class LocalBudget:
    """In-process budget (tests, single-process tools): a GrantBook behind a lock; None = unlimited."""

    def __init__(self, max_labels: int | None = None, max_judge_tokens: int | None = None,
                 tokens_per_request: int = 0):
        self.book = GrantBook(max_labels, max_judge_tokens, tokens_per_request)
        self.counters: Counter = Counter()
        self._lock = threading.Lock()

    @property
    def labels(self) -> int:
        return len(self.book.granted)

    @property
    def generated_tokens(self) -> int:
        return self.book.generated_tokens

    @property
    def prompt_tokens(self) -> int:
        return self.book.prompt_tokens

    def grant(self, keys: list[str], cached: list[bool]) -> list[bool]:
        with self._lock:
            return self.book.grant(keys, cached)[0]

    def spend_tokens(self, key: str, prompt_tokens: int, generated_tokens: int) -> None:
        with self._lock:
            self.book.spend_tokens(key, prompt_tokens, generated_tokens)

    def add_counters(self, counters: dict[str, int]) -> None:
        with self._lock:
            self.counters.update(counters)

    def exhausted(self) -> bool:
        return self.book.exhausted()

    def state(self) -> dict:
        return self.book.state()


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
        keys = [f"oracle:{batch['id'][i]}" for i in wanted]
        granted = self.budget.grant(keys, [False] * len(keys)) if wanted else []
        for i, key, ok in zip(wanted, keys, granted):
            out["label_key"][i] = key
            if not ok:
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
