"""End to end as a user runs it: `ray start --head` on loopback, then `ray job submit -- python jobs/active_train.py`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from actprm_ray.pipeline.ray_env import RAY_ENV_DEFAULTS

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node(tmp_path):
    env = {**os.environ, **RAY_ENV_DEFAULTS}
    env.pop("RAY_ADDRESS", None)
    # Job drivers run `python` from the head's PATH: make it this environment's interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    # Ray's Unix sockets live under the temp dir and must stay under ~107 characters: no pytest tmp_path here.
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    port, dash = _free_port(), _free_port()
    # Every fixed default port gets a free one: the suite's own `ray.init` cluster is alive in this process and its
    # dashboard agent already holds the default 52365, which left this head with no job agent (CI, 800 s of retries).
    agent_ports = [f"--{flag}={_free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
        "ray-client-server-port", "object-manager-port", "node-manager-port")]
    ray_bin = str(Path(sys.executable).parent / "ray")
    # --block keeps the head in this process group: terminating it stops exactly this cluster, never others.
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=2",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", *agent_ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        head.kill()
        pytest.fail("ray head did not come up in 90 s")
    def stop() -> None:
        if head.poll() is None:
            head.terminate()
            try:
                head.wait(timeout=10)  # a graceful stop takes ~30 s; the group is this test's own cluster alone
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, 9)
        shutil.rmtree(temp_dir, ignore_errors=True)  # Ray's temp dir, with the job's working-dir copy

    yield url, env, stop
    stop()


def test_ray_job_submit_active_train(head_node, tmp_path):
    """The README's submit command with the default run.output_dir (a HOME of the test's own): the outputs land
    under ~/actprm_results, the job prints where, and they are still there after the cluster is stopped."""
    url, env, stop_cluster = head_node
    home = tmp_path / "home"
    runtime_env = {"excludes": [".venv", "runs", ".git", "*.parquet"], "env_vars": {"HOME": str(home)}}
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", url, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           # model.backbone=tiny: the default's tiny-math would be pretrained first (minutes) in this HOME's cache;
           # what this test is about is submission and where the outputs land.
           "python", "jobs/active_train.py", "run.name=submitted", "data.synthetic_rows=48", "model.backbone=tiny",
           "model.n_heads=4", "train.micro_batch_size=8", "train.checkpoint_every=2"]
    for _ in range(36):  # up to ~3 min on a loaded machine
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        # The dashboard answers before its job agent registers; the CLI then fails fast with this message.
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            break
        time.sleep(5)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    run_dir = home / "actprm_results" / "submitted"
    assert f"[actprm] run dir {run_dir}" in proc.stdout and f"[actprm] summary: {run_dir}/summary.json" in proc.stdout
    stop_cluster()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run_dir"] == str(run_dir) and Path(summary["checkpoint"]).is_relative_to(run_dir)
    assert (run_dir / "outcomes.parquet").is_file() and (Path(summary["checkpoint"]) / "config.json").is_file()
    assert summary["rows_read"] == 48 and summary["identity_holds"]
    # Clean logs off a TTY (a job's stdout is a log): no progress-bar redraws, no repeated Ray warnings. Before the
    # fix the same job printed thousands of lines (bars redrawn per update, one cleaner warning every few s).
    log = proc.stdout.splitlines()
    print(f"job log: {len(log)} lines")
    bars = [line for line in log if "row/s]" in line or "it/s]" in line]
    assert not bars, f"a progress bar reached the job log: {bars[:4]}"
    assert "Failed to query Ray Train Controller" not in proc.stdout
    assert len(log) < 400, len(log)
    assert summary["outcomes"]["trained"] + summary["outcomes"]["confident"] + summary["outcomes"]["invalid_input"] == 48
