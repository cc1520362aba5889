"""One fake LLM judge for the tests and benchmarks/soak.py: an OpenAI-compatible chat-completions server on loopback.

Each request gets one behaviour (a mode), chosen in this order:

1. the first path segment, when the client's base_url names one (`judge.url("flaky")`, ".../flaky/v1"); a
   segment "mode~tag" behaves as "mode" with a hit counter of its own (for modes whose answer changes after a hit);
2. "outage503" for a request whose ordinal (0-based, arrival order) is in `outage`: a judge outage window;
3. the mode `prompt_modes` maps a marker to, when the prompt contains that marker (rows that ask for their fault);
4. a fault drawn at random from `fault_rates` ("error500", "drop", "garbage"), else "ok".

The modes (MODES): ok (the configured critique); garbage, thinkonly, outofrange (a 200 whose critique does not
parse); flaky (500 twice, then ok); error500; outage503; ratelimited (429, Retry-After 0); retryafter /
retrydate (one 429 asking for 1-2 s, as seconds / as an HTTP-date, then ok); retrylong (429 asking for an hour);
hang (answers after `hang_s`, past a short client timeout); drop (closes without answering); truncated (closes
mid-body); notjson; malformed (no choices); badusage (token counts that are not numbers); reasoning (thinking
returned apart from the answer); reasoningonly (thinking and no answer); echo400 / echo500 / echo200 (a hostile
judge that echoes the Authorization header in a 400, in a 500, inside a good critique).

It counts what a hosted judge would bill: `calls` holds the critiques generated per attempt (messages and seed),
so any count above 1 is a double payment. `replies` counts every request by mode, `hits` by path key (or mode
when the path names none); `bodies` and `auth` keep each request's JSON body and Authorization header.

    with FakeJudge(fault_rates={"error500": 0.1}, latency_s=0.05) as judge:
        ... judge.base_url ... judge.calls ...
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CORRECT = "<analysis_1>fine</analysis_1><conclusion>Correct</conclusion>"
INCORRECT_AT_2 = "<analysis_1>ok</analysis_1><analysis_2>3+4 is 7, not 8</analysis_2>" \
                 "<conclusion>Incorrect: paragraph 2</conclusion>"
USAGE = {"prompt_tokens": 50, "completion_tokens": 20}
# Critiques a 200 may carry that do not parse (the judge's words are wrong, not the transport).
UNUSABLE = {
    "garbage": "\x00\ufffd lorem ipsum }{ <analysis_2 <conclusion Incorrect",
    "thinkonly": "<think>Paragraph 2 looks wrong... <conclusion>Correct</conclusion> but let me re-che",
    "outofrange": "<analysis_1>ok</analysis_1><analysis_7>bad</analysis_7>"
                  "<conclusion>Incorrect: paragraph 7</conclusion>",
}
MODES = frozenset({"ok", *UNUSABLE, "flaky", "error500", "outage503", "ratelimited", "retryafter", "retrydate",
                   "retrylong", "hang", "drop", "truncated", "notjson", "malformed", "badusage", "reasoning",
                   "reasoningonly", "echo400", "echo500", "echo200"})
RANDOM_FAULTS = ("error500", "drop", "garbage")


@dataclass
class Reply:
    code: int
    payload: dict | bytes | None  # None: close the connection without an answer
    headers: dict = field(default_factory=dict)
    billed: bool = False  # a critique was generated: what a hosted judge bills
    truncated: bool = False  # send half the body, then close


def _answer(content: str | None, reasoning: str | None = None, finish: str = "stop") -> dict:
    msg = {"role": "assistant", "content": content}
    if reasoning is not None:
        msg["reasoning"] = reasoning
    return {"choices": [{"message": msg, "finish_reason": finish}], "usage": USAGE}


def reply_for(mode: str, hit: int, critique: str, auth: str) -> Reply:
    """What the judge answers in `mode`; `hit` numbers the requests of this mode's key (1 = the first)."""
    if mode == "flaky":
        mode = "ok" if hit > 2 else "error500"
    elif mode in ("retryafter", "retrydate") and hit > 1:
        mode = "ok"
    if mode in ("ok", "hang"):
        return Reply(200, _answer(critique), billed=True)
    if mode in UNUSABLE:
        return Reply(200, _answer(UNUSABLE[mode]), billed=True)
    if mode == "truncated":
        return Reply(200, _answer(critique), billed=True, truncated=True)
    if mode == "reasoning":
        return Reply(200, _answer(critique, reasoning="Draft <conclusion>Correct</conclusion>"), billed=True)
    if mode == "reasoningonly":  # a reasoning model that spent max_tokens thinking: no answer at all
        return Reply(200, _answer(None, reasoning="Paragraph 1 <conclusion>Correct</conclusion>", finish="length"),
                     billed=True)
    if mode == "echo200":
        seen = re.sub(r"<analysis_1>.*?</analysis_1>", lambda _: f"<analysis_1>seen {auth}</analysis_1>", critique,
                      count=1)
        return Reply(200, _answer(seen), billed=True)
    if mode == "error500":
        return Reply(500, {"error": "internal"})
    if mode == "echo500":
        return Reply(500, {"error": f"upstream rejected {auth}"})
    if mode == "echo400":
        return Reply(400, {"error": f"bad key {auth}"})
    if mode == "outage503":
        return Reply(503, {"error": "judge unavailable"})
    if mode == "ratelimited":
        return Reply(429, {"error": "slow down"}, {"Retry-After": "0"})
    if mode == "retryafter":
        return Reply(429, {"error": "slow down"}, {"Retry-After": "1"})
    if mode == "retrydate":
        return Reply(429, {"error": "slow down"}, {"Retry-After": formatdate(time.time() + 2, usegmt=True)})
    if mode == "retrylong":
        return Reply(429, {"error": "slow down"}, {"Retry-After": "3600"})
    if mode == "drop":
        return Reply(0, None)
    if mode == "notjson":
        return Reply(200, b"<html><body>502 Bad Gateway</body></html>")
    if mode == "malformed":
        return Reply(200, {"choices": [], "usage": USAGE})
    if mode == "badusage":
        return Reply(200, {**_answer(critique), "usage": {"prompt_tokens": "many", "completion_tokens": None}})
    return Reply(404, {"error": f"no such mode {mode!r}"})


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test and benchmark output clean
        pass

    def do_POST(self):
        srv: FakeJudge = self.server  # type: ignore[assignment]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        auth = self.headers.get("Authorization", "")
        path_key = self.path.strip("/").split("/")[0]  # "v1" when the base_url names no mode
        with srv.lock:
            ordinal, srv.requests = srv.requests, srv.requests + 1
            mode = path_key.split("~")[0] if path_key != "v1" else srv.pick_mode(ordinal, body)
            key = path_key if path_key != "v1" else mode
            srv.hits[key] += 1
            reply = reply_for(mode, srv.hits[key], srv.critique, auth)
            srv.replies[mode] += 1
            srv.bodies.append(body)
            srv.auth.append(auth)
            if reply.billed:
                # One attempt = (messages, seed): attempt seeds are deterministic, so a re-sample after a bad
                # critique is a new key, while re-sending the same attempt (e.g. after a crash) bills it twice.
                srv.calls[json.dumps([body["messages"], body.get("seed")], sort_keys=True)] += 1
        time.sleep(srv.latency_s + (srv.hang_s if mode == "hang" else 0.0))
        if reply.payload is None:
            self.close_connection = True  # no answer at all; the client sees the connection close
            return
        data = reply.payload if isinstance(reply.payload, bytes) else json.dumps(reply.payload).encode()
        self.send_response(reply.code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in reply.headers.items():
            self.send_header(k, v)
        self.end_headers()
        if reply.truncated:
            self.wfile.write(data[: len(data) // 2])  # half the promised body, then the socket closes
            self.close_connection = True
        else:
            self.wfile.write(data)


class FakeJudge(ThreadingHTTPServer):
    """A loopback judge; use it as a context manager (it serves from a daemon thread until exit).

    Args:
        critique: what an "ok" answer says (CORRECT, a verdict every row can take, by default).
        fault_rates: probability of each of RANDOM_FAULTS per request without a mode in its path or prompt.
        seed: seeds the fault draws.
        latency_s: think time before every answer (requests are in flight when a labeler dies).
        outage: request ordinals answered 503; may be reassigned between runs.
        prompt_modes: {marker: mode}, for a request whose prompt contains the marker.
        hang_s: extra delay of the "hang" mode.
    """

    daemon_threads = True

    def __init__(self, critique: str = CORRECT, fault_rates: dict[str, float] | None = None, seed: int = 0,
                 latency_s: float = 0.0, outage: range = range(0), prompt_modes: dict[str, str] | None = None,
                 hang_s: float = 1.5):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.critique, self.latency_s, self.outage, self.hang_s = critique, latency_s, outage, hang_s
        self.fault_rates = dict(fault_rates or {})
        self.prompt_modes = dict(prompt_modes or {})
        if unknown := set(self.fault_rates) - set(RANDOM_FAULTS):
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {RANDOM_FAULTS}")
        if unknown := set(self.prompt_modes.values()) - MODES:
            raise ValueError(f"unknown modes {sorted(unknown)}")
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.requests = 0
        self.calls: Counter = Counter()  # billed critiques per (messages, seed): any count > 1 is a double payment
        self.replies: Counter = Counter()  # every request, by mode
        self.hits: Counter = Counter()  # every request, by path key (its mode when the path names none)
        self.bodies: list[dict] = []
        self.auth: list[str] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def url(self, mode: str) -> str:
        """A base_url whose every request gets `mode` ("mode~tag": the same, with its own hit counter)."""
        return f"http://127.0.0.1:{self.server_address[1]}/{mode}/v1"

    def pick_mode(self, ordinal: int, body: dict) -> str:
        if ordinal in self.outage:
            return "outage503"
        prompt = " ".join(str(m.get("content")) for m in body["messages"])
        for marker, mode in self.prompt_modes.items():
            if marker in prompt:
                return mode
        u = self.rng.random()
        for kind, rate in self.fault_rates.items():
            if u < rate:
                return kind
            u -= rate
        return "ok"

    def __enter__(self) -> "FakeJudge":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
