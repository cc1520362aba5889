"""RunCoordinator: the one small named actor a run shares between stages and trainer workers.

It holds the three pieces of run-wide state that must be consistent across replicas:
  * the weight store: (model_version, path of a safetensors file) -- scorers poll it between batches;
  * the label budget: labels granted / consumed by the trainer, judge tokens (the LabelBudget protocol);
  * progress counters for the status line and the summary.
Weights travel as files on the run's storage, not through the actor: a 7B publish is ~15 GB and belongs on
shared storage (a PVC or s3:// on a cluster); the actor only hands out the version and the path.
"""

from __future__ import annotations

import time
from collections import defaultdict

import ray

from actprm_ray.label.base import LocalBudget


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class RunCoordinator:
    def __init__(self, max_labels=None, max_judge_tokens=None):
        self._version, self._path = -1, ""
        self._budget = LocalBudget(max_labels, max_judge_tokens)
        self._consumed = 0  # granted labels the trainer has taken off the stream (trained or failed)
        self._counters: dict[str, float] = defaultdict(float)
        self._started = time.time()

    # weight store
    def publish(self, version: int, path: str) -> None:
        if version <= self._version:
            raise ValueError(f"model_version must increase: {version} <= {self._version}")
        self._version, self._path = version, path

    def latest(self) -> tuple[int, str]:
        return self._version, self._path

    # label budget
    def reserve(self, n: int) -> int:
        return self._budget.reserve(n)

    def spend_tokens(self, prompt_tokens: int, generated_tokens: int) -> None:
        self._budget.spend_tokens(prompt_tokens, generated_tokens)

    def exhausted(self) -> bool:
        return self._budget.exhausted()

    def consume(self, n: int) -> None:
        self._consumed += n

    def all_granted_consumed(self) -> bool:
        """True once the budget is spent and every granted label reached the trainer: time to stop."""
        return self._budget.exhausted() and self._consumed >= self._budget.labels

    def budget_state(self) -> dict:
        return {**self._budget.state(), "consumed": self._consumed}

    # progress
    def add(self, counters: dict) -> None:
        for k, v in counters.items():
            self._counters[k] += v

    def snapshot(self) -> dict:
        return {"version": self._version, "elapsed_s": time.time() - self._started, **self._counters,
                "budget": self.budget_state()}


class CoordinatorBudget:
    """The LabelBudget protocol over the coordinator actor, for labelers running in Ray actors."""

    def __init__(self, handle):
        self.handle = handle

    def reserve(self, n: int) -> int:
        return ray.get(self.handle.reserve.remote(n))

    def spend_tokens(self, prompt_tokens: int, generated_tokens: int) -> None:
        ray.get(self.handle.spend_tokens.remote(prompt_tokens, generated_tokens))

    def exhausted(self) -> bool:
        return ray.get(self.handle.exhausted.remote())

    def add_counters(self, counters: dict[str, int]) -> None:
        # Waited for, so the counts are in before the batch's rows reach the driver's summary.
        ray.get(self.handle.add.remote({f"{JUDGE_PREFIX}{k}": v for k, v in counters.items()}))


JUDGE_PREFIX = "judge_"


def judge_counters(snapshot: dict) -> dict:
    """The labelers' counters from a coordinator snapshot: requests, re-samples, HTTP retries, errors by kind."""
    return {k[len(JUDGE_PREFIX):]: int(v) for k, v in sorted(snapshot.items()) if k.startswith(JUDGE_PREFIX)}


def coordinator_name(run_name: str) -> str:
    return f"actprm-coordinator-{run_name}"


def get_coordinator(run_name: str):
    return ray.get_actor(coordinator_name(run_name), namespace="actprm")
