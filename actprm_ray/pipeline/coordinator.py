"""RunCoordinator: the one small named actor a run shares between stages and trainer workers.

It serialises the decisions that must be consistent across replicas, and keeps nothing it cannot rebuild:
  * the label budget (a GrantBook): every grant is appended to the run ledger's `grants/` *before* the answer
    goes back, so a restarted coordinator (max_restarts=-1) rebuilds grants, token spend and consumed keys from
    the ledger in __init__; its retried calls are idempotent (granting a key twice is free, consuming a key twice
    is a no-op). Consumed keys flushed with the trainer's outcomes survive; the unflushed few do not, which only
    delays the budget stop (the run scores on to the end of the stream; it never spends more);
  * the weight store: (model_version, path of a safetensors file) -- rebuilt as the newest file in weights/;
  * progress counters for the status line and the summary (counters only: nothing is derived from them).
Weights travel as files on the run's storage, not through the actor: a 7B publish is ~15 GB and belongs on
shared storage (a PVC or s3:// on a cluster); the actor only hands out the version and the path.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from pathlib import Path

import ray

from actprm_ray.label.base import GrantBook
from actprm_ray.label.cache import LabelCache
from actprm_ray.ledger import grants_folder
from actprm_ray.select import RateController


def ledger_state(ledger_uri: str, cache_path: str | None, outcomes_dir: str | Path) -> tuple[dict, dict, set]:
    """(granted key -> cached, key -> (prompt, generated) tokens of its responses, keys with a final outcome)."""
    from actprm_ray.pipeline.outcomes import read_outcome_parts

    granted: dict[str, bool] = {}
    for row in grants_folder(ledger_uri).read().to_pylist():
        granted.setdefault(row["key"], row["cached"])
    spent = {}
    if cache_path:
        for e in LabelCache(cache_path).latest(list(granted)).values():
            spent[e.key] = (e.prompt_tokens, e.generated_tokens)
    final = {k for k in read_outcome_parts(Path(outcomes_dir)).column("label_key").to_pylist() if k}
    return granted, spent, final


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class RunCoordinator:
    def __init__(self, run_dir: str, max_labels=None, max_judge_tokens=None, tokens_per_request: int = 0,
                 cache_path: str | None = None, controller: dict | None = None):
        from actprm_ray.ledger import run_ledger_uri

        self._run_dir, self._ledger_uri = Path(run_dir), run_ledger_uri(run_dir)
        self._grants = grants_folder(self._ledger_uri)
        self._book = GrantBook(max_labels, max_judge_tokens, tokens_per_request)
        self._book.restore(*ledger_state(self._ledger_uri, cache_path, self._run_dir / "outcomes"))
        self._version, self._path = self._newest_weights()
        self._counters: dict[str, float] = defaultdict(float)
        self._started = time.time()
        # Soft state: it shapes which rows are asked, never the budget; a restart starts it again at scale 1.
        self._controller = RateController(**controller) if controller else None

    def _newest_weights(self) -> tuple[int, str]:
        files = sorted((self._run_dir / "weights").glob("v*.safetensors"))
        if not files:
            return -1, ""
        return int(re.sub(r"\D", "", files[-1].stem)), str(files[-1])

    # weight store
    def publish(self, version: int, path: str) -> None:
        if version < self._version or (version == self._version and path != self._path):
            raise ValueError(f"model_version must increase: {version} <= {self._version}")
        self._version, self._path = version, path

    def latest(self) -> tuple[int, str]:
        return self._version, self._path

    # label budget
    def grant(self, keys: list[str], cached: list[bool]) -> list[bool]:
        flags, new = self._book.grant(keys, cached)
        # Durable before the answer: a grant the labeler acts on is always in the ledger.
        self._grants.append([{"key": k, "cached": c, "granted_at": time.time()} for k, c in new], tag="grants")
        return flags

    def spend_tokens(self, key: str, prompt_tokens: int, generated_tokens: int) -> None:
        self._book.spend_tokens(key, prompt_tokens, generated_tokens)

    def exhausted(self) -> bool:
        return self._book.exhausted()

    def consume(self, keys: list[str]) -> None:
        self._book.consume(keys)

    def all_granted_consumed(self) -> bool:
        """True once the budget is spent and every granted label reached the trainer: time to stop."""
        return self._book.all_granted_consumed()

    def budget_state(self) -> dict:
        return self._book.state()

    # label-rate controller (select.RateController), shared by every select task
    def decide(self, scores: list[float], candidates: list[bool]) -> tuple[list[bool], list[bool]]:
        selected, audit = self._controller.decide(scores, candidates)
        return selected.tolist(), audit.tolist()

    def record_audits(self, correct: list[bool]) -> None:
        self._counters["audits"] += len(correct)
        self._counters["audits_correct"] += sum(correct)
        if self._controller is not None:
            self._controller.record_audits(correct)

    def controller_state(self) -> dict | None:
        return self._controller.state() if self._controller is not None else None

    # progress
    def add(self, counters: dict) -> None:
        for k, v in counters.items():
            self._counters[k] += v

    def snapshot(self) -> dict:
        return {"version": self._version, "elapsed_s": time.time() - self._started, **self._counters,
                "budget": self.budget_state(), "controller": self.controller_state()}


class CoordinatorBudget:
    """The LabelBudget protocol over the coordinator actor, for labelers running in Ray actors."""

    def __init__(self, handle):
        self.handle = handle

    def grant(self, keys: list[str], cached: list[bool]) -> list[bool]:
        return ray.get(self.handle.grant.remote(keys, cached))

    def spend_tokens(self, key: str, prompt_tokens: int, generated_tokens: int) -> None:
        ray.get(self.handle.spend_tokens.remote(key, prompt_tokens, generated_tokens))

    def exhausted(self) -> bool:
        return ray.get(self.handle.exhausted.remote())

    def add_counters(self, counters: dict[str, int]) -> None:
        # Waited for, so the counts are in before the batch's rows reach the driver's summary.
        ray.get(self.handle.add.remote({f"{JUDGE_PREFIX}{k}": v for k, v in counters.items()}))


class CoordinatorController:
    """The RateController protocol (decide) over the coordinator actor: one controller for all select tasks."""

    def __init__(self, handle):
        self.handle = handle

    def decide(self, scores: list[float], candidates: list[bool]) -> tuple[list[bool], list[bool]]:
        return ray.get(self.handle.decide.remote(list(scores), [bool(c) for c in candidates]))


JUDGE_PREFIX = "judge_"


def judge_counters(snapshot: dict) -> dict:
    """The labelers' counters from a coordinator snapshot: requests, re-samples, HTTP retries, errors by kind."""
    return {k[len(JUDGE_PREFIX):]: int(v) for k, v in sorted(snapshot.items()) if k.startswith(JUDGE_PREFIX)}


def coordinator_name(run_name: str) -> str:
    return f"actprm-coordinator-{run_name}"


def get_coordinator(run_name: str):
    return ray.get_actor(coordinator_name(run_name), namespace="actprm")
