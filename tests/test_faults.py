"""Process faults on a real local Ray cluster: SIGKILL a scorer actor, a labeler actor and a trainer worker in one
run, and the driver in another (then rerun it).

After each the run completes (or, for the driver, a rerun with the same name does), every pool row has exactly one
outcome, and the judge (a counting OpenAI-compatible server on loopback) was paid twice only for the requests that
were in flight when the labeler died (their answers never arrived).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from actprm_ray.config import load_config
from actprm_ray.pipeline.ray_env import RAY_ENV_DEFAULTS
from actprm_ray.testing import JudgeServer, kill_when

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


IN_FLIGHT = 2  # labeler.judge.http.max_concurrency here: requests one labeler has in flight at once


@pytest.fixture
def judge_server():
    # A judge that thinks a little, so requests are in flight when the kill lands.
    with JudgeServer(latency_s=0.05) as srv:
        yield srv


def _overrides(tmp_path, name, *extra):
    return [f"run.name={name}", f"run.output_dir={tmp_path}", "model.n_heads=4", "model.max_length=512",
            "data.synthetic_rows=96", "train.lr=1e-3", "train.warmup_steps=2", "train.total_steps=100",
            "train.micro_batch_size=8", "train.publish_every=1", "train.checkpoint_every=2",
            "train.step_delay_s=0.2",  # slow enough that the kill lands mid-run
            "pipeline.status_every_s=5", "pipeline.score_batch_size=8", "pipeline.label_batch_size=8",
            "pipeline.no_progress_timeout_s=300", *extra]


def _http_judge(srv) -> list[str]:
    return ["labeler.kind=http", "labeler.judge.judge_id=counting", "labeler.judge.model=counting-judge",
            f"labeler.judge.http.base_url={srv.base_url}", "labeler.judge.http.qps=0",
            f"labeler.judge.http.max_concurrency={IN_FLIGHT}",
            "labeler.judge.http.backoff_s=0.05", "selection.mode=all"]


def _run_and_kill(tmp_path, name, overrides, kills):
    """Run the loop while one thread per (actor title, ready(snapshot)) SIGKILLs those actors once ready."""
    from actprm_ray.pipeline.active import run_active
    from actprm_ray.pipeline.coordinator import coordinator_name

    killed: dict[str, list[int]] = {title: [] for title, _ in kills}
    threads = [threading.Thread(target=kill_when, args=(coordinator_name(name), ready, title, killed[title]),
                                daemon=True) for title, ready in kills]
    for t in threads:
        t.start()
    summary = run_active(load_config(None, overrides))
    for t in threads:
        t.join(timeout=1)
    for title, pids in killed.items():
        assert pids, f"nothing titled {title!r} was killed: the run ended first"
    return summary


def _assert_every_row_once(summary, n):
    rows = pq.read_table(f"{summary['run_dir']}/outcomes.parquet").to_pylist()
    assert summary["identity_holds"] and summary["rows_read"] == n == len(rows)
    assert len({r["id"] for r in rows}) == n
    return rows


def _repaid(calls) -> int:
    """Requests billed more than once: the answer never reached the labeler (it died with them in flight)."""
    return sum(c - 1 for c in calls.values())


def test_scorer_labeler_and_trainer_worker_killed_in_one_run(ray_local, judge_server, tmp_path):
    """Three crashes in one run (one run keeps CI inside its budget): a scorer actor, then a labeler actor, then a
    trainer worker, which FailureConfig restores from the last checkpoint."""
    overrides = _overrides(tmp_path, "kill3", *_http_judge(judge_server), "train.max_failures=1")
    summary = _run_and_kill(tmp_path, "kill3", overrides, [
        ("ScoreStage", lambda s: s.get("scored", 0) >= 16),
        ("LabelStage", lambda s: s.get("labelled", 0) >= 24),
        ("RayTrainWorker", lambda s: s.get("trained_steps", 0) >= 5)])
    rows = _assert_every_row_once(summary, 96)
    assert summary["outcomes"]["trained"] > 0
    # The restored group re-reads the stream: rows with a checkpointed outcome come back and are skipped (counted).
    assert summary["trainer"]["redelivered"] > 0
    # The labeler's batch is re-run: every answer that had arrived comes from the durable cache (one entry per
    # response), so only the requests in flight at the kill are sent again -- fewer than the batch's 8.
    calls = judge_server.calls
    assert _repaid(calls) <= IN_FLIGHT, f"{_repaid(calls)} requests paid twice, more than the {IN_FLIGHT} in flight"
    labelled = [r for r in rows if r["outcome"] in ("trained", "label_failed")]
    assert 0 < len(calls) <= len(labelled)  # distinct prompts paid for: none for a row that was not labelled


@pytest.mark.extended  # two full runs in a subprocess, ~4 min on 2 cores
def test_driver_sigkill_then_rerun_resumes_and_repays_at_most_the_requests_in_flight(judge_server, tmp_path):
    """The driver is a separate process (its own local Ray, as `python jobs/active_train.py` runs)."""
    import psutil

    env = {**os.environ, **RAY_ENV_DEFAULTS, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(REPO / "jobs" / "active_train.py"),
           *_overrides(tmp_path, "kill_driver", *_http_judge(judge_server))]
    outcomes = tmp_path / "kill_driver" / "outcomes"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not any(outcomes.glob("*.parquet")):
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        tree = [proc] + psutil.Process(proc.pid).children(recursive=True)
        for p in tree:  # the whole local cluster goes with the driver, as on a lost head node
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=60)
    paid_before = sum(judge_server.calls.values())
    assert paid_before > 0

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    summary = json.loads((tmp_path / "kill_driver" / "summary.json").read_text())
    _assert_every_row_once(summary, 96)
    assert summary["labels_used_before_resume"] > 0  # it resumed, not restarted
    assert _repaid(judge_server.calls) <= IN_FLIGHT, "more requests paid twice than were in flight at the kill"
    labelled = summary["outcomes"]["trained"] + summary["outcomes"]["label_failed"]
    assert sum(judge_server.calls.values()) <= labelled + IN_FLIGHT
