"""Fault injection shared by the fault tests and benchmarks/soak.py: a billing judge server and an actor killer.

`JudgeServer` is a real OpenAI-compatible chat-completions server on loopback. It counts every billed request
per attempt (prompt and seed: what a hosted judge would bill) and can misbehave at random: HTTP 500, a dropped
connection, or a garbage critique, and refuse a window of requests with 503 (an outage). `kill_actor_processes` SIGKILLs this Ray cluster's actor processes by title.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CORRECT_VERDICT = "<analysis_1>fine</analysis_1><conclusion>Correct</conclusion>"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test and benchmark output clean
        pass

    def do_POST(self):
        srv: JudgeServer = self.server  # type: ignore[assignment]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        # One attempt = (prompt, seed): attempt seeds are deterministic, so a re-sample after a bad critique is a
        # new key, while re-sending the same attempt (e.g. after a crash) bills the same key twice.
        prompt = json.dumps([body["messages"], body.get("seed")], sort_keys=True)
        with srv.lock:
            ordinal, srv.requests = srv.requests, srv.requests + 1
            fault = "outage503" if ordinal in srv.outage else srv.draw_fault()
            srv.faults[fault] += 1
            if fault in ("ok", "garbage"):  # a critique was generated: that is what a judge bills
                srv.calls[prompt] += 1
        time.sleep(srv.latency_s)
        if fault == "drop":
            self.close_connection = True  # no answer at all; the client sees the connection close
            return
        if fault == "error500":
            return self._reply(500, {"error": "injected"})
        if fault == "outage503":
            return self._reply(503, {"error": "judge unavailable"})
        content = CORRECT_VERDICT if fault == "ok" else "I think it is probably fine, maybe."
        self._reply(200, {"choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                          "usage": {"prompt_tokens": 40, "completion_tokens": 12}})

    def _reply(self, code: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class JudgeServer(ThreadingHTTPServer):
    """`with JudgeServer(fault_rates={"error500": 0.1}) as srv: ... srv.base_url ... srv.calls`."""

    daemon_threads = True

    def __init__(self, fault_rates: dict[str, float] | None = None, seed: int = 0, latency_s: float = 0.0,
                 outage: range = range(0)):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.outage = outage  # request ordinals (0-based, in arrival order) answered 503: a judge outage window
        self.requests = 0
        self.fault_rates = dict(fault_rates or {})
        self.latency_s = latency_s  # think time before each critique: requests are in flight when a labeler dies
        unknown = set(self.fault_rates) - {"error500", "drop", "garbage"}
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}")
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.calls: Counter = Counter()  # billed critiques per (prompt, seed): any count > 1 is a double payment
        self.faults: Counter = Counter()  # every request, by what the server did

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def draw_fault(self) -> str:
        u = self.rng.random()
        for kind, rate in self.fault_rates.items():
            if u < rate:
                return kind
            u -= rate
        return "ok"

    def __enter__(self) -> "JudgeServer":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


def actor_processes(title: str, root_pid: int | None = None) -> list:
    """This cluster's actor processes whose Ray title contains `title`.

    Ray titles an actor's process after the actor's repr (`ray::MapWorker(MapBatches(ScoreStage))`,
    `ray::RayTrainWorker`). A local cluster's processes descend from its driver, so searching below root_pid
    (default: this process) leaves other clusters on the same machine alone."""
    import psutil

    found = []
    for p in psutil.Process(root_pid or os.getpid()).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if cmd.startswith("ray::") and title in cmd:
            found.append(p)
    return found


def kill_actor_processes(title: str, root_pid: int | None = None) -> list[int]:
    """SIGKILL (a real crash, no clean-up) every matching actor process; returns their pids."""
    killed = []
    for p in actor_processes(title, root_pid):
        try:
            os.kill(p.pid, signal.SIGKILL)
            killed.append(p.pid)
        except ProcessLookupError:
            pass
    return killed


def kill_when(coordinator_name: str, ready, title: str, killed: list, timeout_s: float = 600.0) -> None:
    """Poll the run's coordinator; once ready(snapshot) holds, kill the actors titled `title` (into `killed`)."""
    import ray

    deadline = time.time() + timeout_s
    pending = None  # one snapshot call at a time: on a loaded machine timed-out calls would pile up in its queue
    while time.time() < deadline:
        try:
            if pending is None:
                pending = ray.get_actor(coordinator_name, namespace="actprm").snapshot.remote()
            done, _ = ray.wait([pending], timeout=5)
            if not done:
                continue
            snapshot, pending = ray.get(pending), None
        except Exception:  # noqa: BLE001 -- the run has not created its coordinator yet (or it restarted)
            pending = None
            time.sleep(0.5)
            continue
        if ready(snapshot):
            killed.extend(kill_actor_processes(title))
            if killed:
                return
        time.sleep(0.2)
