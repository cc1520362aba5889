"""JudgeLabeler's control flow (cache, budget, retries, columns) with a scripted judge in place of an engine.

The engines themselves are exercised for real in test_vllm_judge.py and test_http_judge.py; here the judge's
text is scripted so that each rule of the flow can be checked on a hand-worked case.
"""

from __future__ import annotations

import numpy as np
import pytest

from actprm_ray.label.base import LABEL_COLUMNS, NO_LABEL, LocalBudget
from actprm_ray.label.cache import LabelCache
from actprm_ray.label.judge import Generation, JudgeConfig, JudgeLabeler

GOOD_2 = "<analysis_1>ok</analysis_1><analysis_2>bad</analysis_2><conclusion>Incorrect: paragraph 2</conclusion>"
CORRECT = "<analysis_1>ok</analysis_1><analysis_2>ok</analysis_2><analysis_3>ok</analysis_3>" \
          "<conclusion>Correct</conclusion>"
GARBAGE = "lorem ipsum"


class ScriptedJudge(JudgeLabeler):
    """Answers each prompt with the next scripted text for its question; records every call."""

    source_prefix = "scripted"

    def __init__(self, config, script: dict[str, list], **kw):
        super().__init__(config, **kw)
        self.script = {q: list(v) for q, v in script.items()}
        self.calls: list[tuple[list[str], list[int]]] = []

    def generate(self, prompts, seeds, num_steps):
        self.calls.append((prompts, seeds))
        out = []
        for p in prompts:
            question = p.split("<problem>\n", 1)[1].split("\n</problem>", 1)[0]
            item = self.script[question].pop(0)
            out.append(item if isinstance(item, Generation) else Generation(item, 100, len(item)))
        return out


def make_batch(questions, selected=None, steps=None):
    n = len(questions)
    steps = steps or [["a is 1.", "b is 2.", "c is 3."]] * n
    col = np.empty(n, dtype=object)
    for i, s in enumerate(steps):
        col[i] = s
    return {
        "id": np.array([f"id{i}" for i in range(n)], dtype=object),
        "question": np.array(questions, dtype=object),
        "steps": col,
        "selected": np.array(selected if selected is not None else [True] * n),
        "extra": np.arange(n),
    }


def cfg(**kw) -> JudgeConfig:
    return JudgeConfig(judge_id="scripted-judge", **kw)


def test_labels_selected_rows_and_passes_the_others_through():
    judge = ScriptedJudge(cfg(), {"q0": [GOOD_2], "q2": [CORRECT]})
    out = judge(make_batch(["q0", "q1", "q2"], selected=[True, False, True]))
    assert set(LABEL_COLUMNS) <= set(out) and list(out["extra"]) == [0, 1, 2]
    assert list(out["label_status"]) == ["ok", "skipped", "ok"]
    assert list(out["first_error_step"]) == [1, NO_LABEL, -1]
    assert out["hard_labels"][0] == [1, 0] and out["hard_labels"][1] == [] and out["hard_labels"][2] == [1, 1, 1]
    assert list(out["label_source"]) == ["scripted:scripted-judge", "", "scripted:scripted-judge"]
    assert list(out["judge_prompt_tokens"]) == [100, 0, 100]
    assert list(out["judge_tokens"]) == [len(GOOD_2), 0, len(CORRECT)]
    assert list(out["label_attempts"]) == [1, 0, 1]
    assert out["label_key"][1] == "" and len(out["label_key"][0]) == 64
    assert len(judge.calls) == 1  # one engine call per batch


def test_invalid_input_costs_no_label_and_no_call():
    budget = LocalBudget()
    judge = ScriptedJudge(cfg(), {}, budget=budget)
    out = judge(make_batch(["q0"], steps=[["fine", "  \n\n "]]))
    assert out["label_status"][0] == "failed" and out["label_reason"][0].startswith("invalid input: step 1")
    assert judge.calls == [] and budget.labels == 0


def test_failed_parse_is_retried_with_a_new_seed_and_every_attempt_is_paid():
    budget = LocalBudget()
    judge = ScriptedJudge(cfg(max_attempts=3), {"q0": [GARBAGE, GOOD_2]}, budget=budget)
    out = judge(make_batch(["q0"]))
    assert out["label_status"][0] == "ok" and out["first_error_step"][0] == 1
    assert out["label_attempts"][0] == 2
    assert out["judge_tokens"][0] == len(GARBAGE) + len(GOOD_2) and out["judge_prompt_tokens"][0] == 200
    assert budget.labels == 1 and budget.generated_tokens == len(GARBAGE) + len(GOOD_2)
    (_, seeds1), (_, seeds2) = judge.calls
    assert seeds1 != seeds2


def test_out_of_attempts_is_failed_with_the_last_reason_and_cached(tmp_path):
    cache = LabelCache(tmp_path / "labels")
    judge = ScriptedJudge(cfg(max_attempts=2), {"q0": [GARBAGE, "<think>never ends"]}, cache=cache)
    out = judge(make_batch(["q0"]))
    assert out["label_status"][0] == "failed" and "thinking" in out["label_reason"][0]
    assert out["label_attempts"][0] == 2
    stored = cache.get_many([out["label_key"][0]])[out["label_key"][0]]
    assert stored.status == "failed" and stored.attempts == 2 and stored.critique == "<think>never ends"


def test_second_pass_hits_the_cache_and_pays_nothing(tmp_path):
    path = tmp_path / "labels"
    first = ScriptedJudge(cfg(cache_path=str(path)), {"q0": [GOOD_2], "q1": [GARBAGE]})
    out1 = first(make_batch(["q0", "q1"]))
    budget = LocalBudget()
    second = ScriptedJudge(cfg(cache_path=str(path)), {}, budget=budget)  # an empty script: any call would fail
    out2 = second(make_batch(["q0", "q1"]))
    # Both labels are used (granted, as cache hits), and nothing is paid.
    assert second.calls == [] and budget.labels == 2 and budget.state()["cached"] == 2
    assert budget.generated_tokens == 0
    assert list(out2["label_cache_hit"]) == [True, True]
    assert list(out2["label_status"]) == ["ok", "failed"] and out2["label_reason"][1] == out1["label_reason"][1]
    assert list(out2["first_error_step"]) == [1, NO_LABEL] and out2["hard_labels"][0] == [1, 0]
    assert list(out2["judge_tokens"]) == [0, 0] and list(out2["label_attempts"]) == [0, 0]
    assert list(out2["label_key"]) == list(out1["label_key"])
    assert second.stats["cache_hits"] == 2


def test_cache_key_changes_with_sampling(tmp_path):
    path = str(tmp_path / "labels")
    ScriptedJudge(cfg(cache_path=path), {"q0": [GOOD_2]})(make_batch(["q0"]))
    hotter = ScriptedJudge(cfg(cache_path=path, temperature=0.9), {"q0": [CORRECT]})
    out = hotter(make_batch(["q0"]))
    assert len(hotter.calls) == 1 and out["first_error_step"][0] == -1 and not out["label_cache_hit"][0]


def test_cached_failure_is_retried_when_max_attempts_grew(tmp_path):
    path = str(tmp_path / "labels")
    once = ScriptedJudge(cfg(cache_path=path, max_attempts=1), {"q0": [GARBAGE]})
    once(make_batch(["q0"]))
    seed_first = once.calls[0][1][0]
    more = ScriptedJudge(cfg(cache_path=path, max_attempts=2), {"q0": [GOOD_2]})
    out = more(make_batch(["q0"]))
    assert out["label_status"][0] == "ok" and out["label_attempts"][0] == 1 and not out["label_cache_hit"][0]
    assert more.calls[0][1][0] != seed_first  # the second attempt overall, so a new seed
    stored = LabelCache(path).get_many([out["label_key"][0]])[out["label_key"][0]]
    assert stored.attempts == 2 and stored.generated_tokens == len(GARBAGE) + len(GOOD_2)


def test_label_budget_counts_hits_as_used_but_unpaid_and_marks_the_rest_over_budget(tmp_path):
    path = str(tmp_path / "labels")
    ScriptedJudge(cfg(cache_path=path), {"q0": [GOOD_2]})(make_batch(["q0"]))
    budget = LocalBudget(max_labels=2)
    judge = ScriptedJudge(cfg(cache_path=path), {"q1": [CORRECT], "q2": [CORRECT]}, budget=budget)
    out = judge(make_batch(["q0", "q1", "q2"]))
    assert list(out["label_status"]) == ["ok", "ok", "over_budget"]
    assert list(out["label_cache_hit"]) == [True, False, False]
    assert out["label_reason"][2] == "label budget exhausted" and out["label_source"][2] == ""
    assert budget.labels == 2 and budget.state()["cached"] == 1
    assert [len(p) for p, _ in judge.calls] == [1]  # paid requests = max_labels - cache hits
    again = judge(make_batch(["q1", "q2"]))  # a re-run batch: q1's grant is reused, q2 still has no room
    assert list(again["label_status"]) == ["ok", "over_budget"] and budget.labels == 2


def test_token_budget_stops_the_next_batch_and_pending_retries():
    budget = LocalBudget(max_judge_tokens=len(GARBAGE) + 1)
    judge = ScriptedJudge(cfg(max_attempts=3), {"q0": [GARBAGE, GOOD_2], "q1": [GARBAGE, GOOD_2]}, budget=budget)
    out = judge(make_batch(["q0", "q1"]))
    # The first round is paid for (2 x len(GARBAGE) > cap), so no second round is started.
    assert list(out["label_status"]) == ["failed", "failed"]
    assert all("not retried: budget exhausted" in r for r in out["label_reason"])
    assert len(judge.calls) == 1 and budget.exhausted()
    out2 = judge(make_batch(["q2"]))
    assert out2["label_status"][0] == "over_budget" and len(judge.calls) == 1


def test_a_transient_call_error_is_not_final_and_a_rerun_asks_again(tmp_path):
    cache = LabelCache(tmp_path / "labels")
    err = Generation("", 0, 0, error="http judge failed: gave up after 3 tries", transient=True)
    budget = LocalBudget(max_labels=2)
    judge = ScriptedJudge(cfg(max_attempts=3), {"q0": [err], "q1": [GOOD_2]}, cache=cache, budget=budget)
    out = judge(make_batch(["q0", "q1"]))
    assert list(out["label_status"]) == ["transient", "ok"]
    assert out["label_reason"][0] == "http judge failed: gave up after 3 tries" and out["label_attempts"][0] == 1
    assert len(judge.calls) == 1  # not re-sampled in this run
    assert len(cache) == 1 and cache.latest([out["label_key"][0]])[out["label_key"][0]].status == "transient"
    rerun = ScriptedJudge(cfg(max_attempts=3), {"q0": [CORRECT]}, cache=cache, budget=budget)
    out2 = rerun(make_batch(["q0", "q1"]))
    assert list(out2["label_status"]) == ["ok", "ok"] and list(out2["label_cache_hit"]) == [False, True]
    assert budget.labels == 2  # q0's grant is reused: the outage cost no label


def test_a_permanent_call_error_is_final_and_recorded(tmp_path):
    cache = LabelCache(tmp_path / "labels")
    err = Generation("", 0, 0, error="http judge failed: HTTP 400: 'prompt too long'")
    judge = ScriptedJudge(cfg(max_attempts=1), {"q0": [err]}, cache=cache)
    out = judge(make_batch(["q0"]))
    assert out["label_status"][0] == "failed"
    again = ScriptedJudge(cfg(max_attempts=1), {}, cache=cache)(make_batch(["q0"]))
    assert again["label_status"][0] == "failed" and again["label_cache_hit"][0]


def test_length_cut_is_named_in_the_reason():
    cut = Generation("<analysis_1>still writ", 100, 8192, finish_reason="length")
    out = ScriptedJudge(cfg(), {"q0": [cut]})(make_batch(["q0"]))
    assert out["label_status"][0] == "failed" and out["label_reason"][0].endswith("(output cut at max_tokens)")


def test_seeds_do_not_depend_on_batch_composition():
    a = ScriptedJudge(cfg(), {"q0": [GOOD_2], "q1": [GOOD_2]})
    a(make_batch(["q0", "q1"]))
    b = ScriptedJudge(cfg(), {"q1": [GOOD_2]})
    b(make_batch(["q1"]))
    assert a.calls[0][1][1] == b.calls[0][1][0]
    assert a.calls[0][1][0] != a.calls[0][1][1]


def test_generate_must_answer_every_prompt():
    class Short(ScriptedJudge):
        def generate(self, prompts, seeds, num_steps):
            return []

    with pytest.raises(RuntimeError):
        Short(cfg(), {})(make_batch(["q0"]))


class ProcessDied(BaseException):
    """Stands in for SIGKILL mid-batch: nothing after the raise runs (not even `except Exception`)."""


class DiesInRoundTwo(ScriptedJudge):
    def generate(self, prompts, seeds, num_steps):
        if self.calls:
            raise ProcessDied()
        return super().generate(prompts, seeds, num_steps)


def test_a_batch_killed_between_rounds_keeps_what_it_paid(tmp_path):
    """Ray re-runs a batch whose actor died; every round already answered is in the cache by then."""
    path = tmp_path / "labels"
    dying = DiesInRoundTwo(cfg(cache_path=str(path), max_attempts=2), {"q0": [GOOD_2], "q1": [GARBAGE]})
    with pytest.raises(ProcessDied):
        dying(make_batch(["q0", "q1"]))

    rerun = ScriptedJudge(cfg(cache_path=str(path), max_attempts=2), {"q1": [GOOD_2]}, budget=LocalBudget())
    out = rerun(make_batch(["q0", "q1"]))
    assert list(out["label_status"]) == ["ok", "ok"] and list(out["label_cache_hit"]) == [True, False]
    assert len(rerun.calls) == 1 and len(rerun.calls[0][0]) == 1  # only q1's second attempt is paid again
    assert rerun.budget.labels == 2  # a fresh budget: q0 used from the cache, q1's retry granted
    assert rerun.cache.get_many([out["label_key"][1]])[out["label_key"][1]].attempts == 2  # 1 before + 1 now
