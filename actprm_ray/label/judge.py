"""JudgeLabeler: the shared half of the vLLM and HTTP judges (METHOD §7, §12), following label/base.py.

For the selected rows of a batch:

    canonicalise -> cache lookup -> budget.grant(keys) (a hit uses a label but sends no request) -> generate
      -> parse -> ledger put as each response arrives (INVALID judgements and transient failures too)
      -> failed parses retried with a new seed, up to max_attempts (every attempt's tokens are spent)
      -> label columns

Subclasses implement `generate`, which turns prompts into Generations and never raises for a single row (a
row-level problem is a Generation with `error` set), and may override `generate_iter` to hand back each response
as it finishes. Non-selected rows pass through as "skipped".
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional

import numpy as np

from actprm_ray.config import HttpJudgeConfig, JudgeConfig  # noqa: F401  (re-exported: the schema lives in config)
from actprm_ray.data.step_format import StepFormatError, labels_from_first_error
from actprm_ray.label.base import NO_LABEL, LabelBudget, LocalBudget, empty_label_columns
from actprm_ray.label.cache import FAILED, TRANSIENT, CacheEntry, LabelCache, label_key
from actprm_ray.label.parse import ParseResult, parse_judge_output
from actprm_ray.label.prompt import PROMPT_VERSION, canonical_judge_input, render_judge_prompt


@dataclass
class Generation:
    """One judge call's result. `error` set = the call itself failed (no critique): not parsed, not cached."""

    text: str
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str = ""  # "stop" | "length" | ... as the engine reports it
    error: Optional[str] = None
    # With `error`: True when asking again later may succeed (judge unreachable after the HTTP retries, engine
    # death); such a row is not final. False: the request itself is bad (prompt too long, HTTP 400).
    transient: bool = False


def judgement_params(config: JudgeConfig) -> dict:
    """Everything besides the text, judge and prompt that decides a stored judgement (goes into the key).

    max_attempts is left out on purpose: a cached failure with fewer attempts than the current max_attempts is
    re-judged (see JudgeLabeler), so raising max_attempts never throws away good labels.
    """
    params = dict(temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_tokens,
                  seed=config.seed, guided=config.guided, strict=config.strict)
    if config.guided:
        params.update(guided_max_analysis_chars=config.guided_max_analysis_chars,
                      reasoning_parser=config.reasoning_parser)
    return params


def attempt_seed(key: str, attempt: int) -> int:
    """A per-(row, attempt) seed: independent of batch composition, new for every retry, stable across reruns."""
    return int(hashlib.sha256(f"{key}/{attempt}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


@dataclass
class _Row:
    index: int
    question: str
    steps: list[str]
    key: str
    prior: Optional[CacheEntry] = None  # a cached failure being retried
    attempts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    text: str = ""
    result: Optional[ParseResult] = None
    call_error: Optional[str] = None
    transient: bool = False


class JudgeLabeler:
    """Base class of the judge labelers; a Ray Data stage: `JudgeLabeler(config)`, then `labeler(batch)`.

    Args:
        config: the judge settings.
        budget: shared label/token caps (a Ray actor handle in a run); default an unlimited LocalBudget.
        cache: a LabelCache; default one at config.cache_path, or none when that is None.
    """

    source_prefix = "judge"

    def __init__(self, config: JudgeConfig, budget: LabelBudget | None = None, cache: LabelCache | None = None):
        self.config = config
        self.budget = budget if budget is not None else LocalBudget()
        self.cache = cache if cache is not None else (LabelCache(config.cache_path) if config.cache_path else None)
        self.source = f"{self.source_prefix}:{config.judge_id}"
        self.params = judgement_params(config)
        self.stats: Counter = Counter()  # this replica's totals: requests, tokens, hits, outcomes

    def generate(self, prompts: list[str], seeds: list[int], num_steps: list[int]) -> list[Generation]:
        """One Generation per prompt, in order. `num_steps` lets a guided backend build each row's grammar."""
        raise NotImplementedError

    def generate_iter(self, prompts: list[str], seeds: list[int], num_steps: list[int]) -> Iterator[tuple[int, Generation]]:
        """(index, Generation) pairs as each finishes. Default: one generate() call, in order. A backend whose
        requests finish one by one (HTTP) yields each as it arrives, so a paid judgement is cached at once and a
        labeler killed mid-round re-pays only the requests still in flight."""
        gens = self.generate(prompts, seeds, num_steps)
        if len(gens) != len(prompts):
            raise RuntimeError(f"generate returned {len(gens)} results for {len(prompts)} prompts")
        yield from enumerate(gens)

    def key_for(self, question: str, steps: list[str]) -> str:
        return label_key(question, steps, self.config.judge_id, self.config.prompt_version, self.params)

    def counters(self) -> Counter:
        """This replica's running totals (requests, re-samples, tokens, outcomes); backends add their own."""
        return Counter(self.stats)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        before = self.counters()
        out = self._label(batch)
        # Per-batch increments go to the shared budget, so a run's summary adds up every replica's counts.
        increments = self.counters() - before
        if increments:
            self.budget.add_counters(dict(increments))
        return out

    def _label(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        out = empty_label_columns(n)
        rows: list[_Row] = []
        for i in range(n):
            if not bool(batch["selected"][i]):
                continue
            try:
                q, steps = canonical_judge_input(batch["question"][i], batch["steps"][i], self.config.sep)
            except StepFormatError as e:
                # Not sent to the judge, so it costs no label; the pipeline routes it to the outcome table.
                out["label_status"][i], out["label_reason"][i] = "failed", f"invalid input: {e}"
                self.stats["invalid_input"] += 1
                continue
            rows.append(_Row(index=i, question=q, steps=steps, key=self.key_for(q, steps)))

        cached = self.cache.get_many([r.key for r in rows]) if self.cache is not None and rows else {}
        hits: dict[int, object] = {}
        for r in rows:
            entry = cached.get(r.key)
            if entry is not None and entry.status == "failed" and entry.attempts < self.config.max_attempts:
                r.prior = entry  # an earlier run gave up sooner (smaller max_attempts or budget): keep trying
            elif entry is not None:
                hits[r.index] = entry
        # Every label used is granted, a cache hit too (it costs no request): the budget and the stop rule see
        # every label the trainer will get.
        granted = self.budget.grant([r.key for r in rows], [r.index in hits for r in rows]) if rows else []
        judged = []
        for r, ok in zip(rows, granted):
            if not ok:
                out["label_status"][r.index], out["label_reason"][r.index] = "over_budget", "label budget exhausted"
                out["label_key"][r.index] = r.key
                self.stats["over_budget"] += 1
            elif r.index in hits:
                self._fill_from_cache(out, r, hits[r.index])
            else:
                judged.append(r)
        if judged:
            self._judge(judged)
            self._fill_judged(out, judged)
        return {**batch, **out}

    def _judge(self, rows: list[_Row]) -> None:
        """Call the judge until each row parses or runs out of attempts; one generate_iter() call per round."""
        pending, first_round = rows, True
        while pending:
            if not first_round and self.budget.exhausted():
                for r in pending:
                    r.result.reason += "; not retried: budget exhausted"
                break
            prompts = [render_judge_prompt(r.question, r.steps) for r in pending]
            seeds = [attempt_seed(r.key, self._done_attempts(r)) for r in pending]
            retry, done = [], 0
            for j, g in self.generate_iter(prompts, seeds, [len(r.steps) for r in pending]):
                r, done = pending[j], done + 1
                if self._take(r, g):
                    retry.append(r)
                    self.stats["resamples"] += 1
                # Stored as each response arrives: if this process dies later, Ray re-runs the batch and what was
                # already paid comes from the ledger (a failure so far counts as `prior`). A transient failure is
                # stored too (the record of what happened), but is never served as a hit.
                self._store([r])
            if done != len(pending):
                raise RuntimeError(f"generate_iter returned {done} results for {len(pending)} prompts")
            self.stats["generate_calls"] += 1
            pending, first_round = retry, False

    def _take(self, r: _Row, g: Generation) -> bool:
        """Book one response against its row; True when the row should be re-sampled."""
        r.attempts += 1
        r.prompt_tokens += g.prompt_tokens
        r.generated_tokens += g.generated_tokens
        self.budget.spend_tokens(r.key, g.prompt_tokens, g.generated_tokens)
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += g.prompt_tokens
        self.stats["generated_tokens"] += g.generated_tokens
        if g.error is not None:
            # The backend already retried transport errors; a judge that cannot be reached is not an INVALID
            # judgement, so it is not re-sampled; a transient one is asked again on a rerun.
            r.call_error, r.transient = g.error, g.transient
            return False
        r.text = g.text
        r.result = parse_judge_output(g.text, len(r.steps), strict=self.config.strict)
        if not r.result.ok and g.finish_reason == "length":
            r.result.reason += " (output cut at max_tokens)"
        return not r.result.ok and self._done_attempts(r) < self.config.max_attempts

    def _store(self, rows: list[_Row]) -> None:
        if self.cache is not None and rows:
            self.cache.put_many([self._entry(r) for r in rows])

    @staticmethod
    def _done_attempts(r: _Row) -> int:
        return r.attempts + (r.prior.attempts if r.prior is not None else 0)

    def _fill_judged(self, out: dict[str, np.ndarray], rows: list[_Row]) -> None:
        for r in rows:
            i = r.index
            out["label_source"][i], out["label_key"][i] = self.source, r.key
            out["judge_prompt_tokens"][i], out["judge_tokens"][i] = r.prompt_tokens, r.generated_tokens
            out["label_attempts"][i] = r.attempts
            if r.call_error is not None:
                out["label_status"][i] = "transient" if r.transient else "failed"
                out["label_reason"][i] = r.call_error
                self.stats["transient" if r.transient else "failed"] += 1
                self.stats["call_errors"] += 1
            elif r.result.ok:
                out["label_status"][i], out["first_error_step"][i] = "ok", r.result.first_error_step
                out["hard_labels"][i] = list(r.result.hard_labels)
                self.stats["ok"] += 1
                self.stats["mismatch"] += int(r.result.mismatch)
            else:
                out["label_status"][i], out["label_reason"][i] = "failed", r.result.reason
                self.stats["failed"] += 1

    def _fill_from_cache(self, out: dict[str, np.ndarray], r: _Row, entry: CacheEntry) -> None:
        i = r.index
        out["label_key"][i], out["label_source"][i], out["label_cache_hit"][i] = r.key, entry.source, True
        self.stats["cache_hits"] += 1
        if entry.status == "ok":
            out["label_status"][i], out["first_error_step"][i] = "ok", entry.k
            out["hard_labels"][i] = labels_from_first_error(entry.k, len(r.steps))
            self.stats["ok"] += 1
        else:
            out["label_status"][i], out["label_reason"][i] = "failed", entry.reason
            self.stats["failed"] += 1

    def _entry(self, r: _Row) -> CacheEntry:
        if r.call_error is not None:
            return CacheEntry(key=r.key, status=TRANSIENT if r.transient else FAILED, k=NO_LABEL, reason=r.call_error,
                              critique="", source=self.source, num_steps=len(r.steps), prompt_tokens=r.prompt_tokens,
                              generated_tokens=r.generated_tokens, attempts=self._done_attempts(r))
        ok = r.result.ok
        prior_p = r.prior.prompt_tokens if r.prior is not None else 0
        prior_g = r.prior.generated_tokens if r.prior is not None else 0
        return CacheEntry(
            key=r.key,
            status="ok" if ok else "failed",
            k=r.result.first_error_step if ok else NO_LABEL,
            reason=r.result.reason,
            critique=r.text,
            source=self.source,
            num_steps=len(r.steps),
            prompt_tokens=prior_p + r.prompt_tokens,
            generated_tokens=prior_g + r.generated_tokens,
            attempts=self._done_attempts(r),
            mismatch=r.result.mismatch,
        )
