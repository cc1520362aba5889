"""HttpJudgeLabeler: a judge behind any OpenAI-compatible /v1/chat/completions endpoint (remote `vllm serve`,
a hosted reasoning model, ...), called with httpx.

Per labeler replica: requests run on `max_concurrency` threads, started at most `qps` per second. A request
that meets 408/425/429, 5xx, a timeout or a broken connection (refused, reset, closed mid-response) is retried
up to `max_retries` times with exponential backoff; a Retry-After header (seconds or HTTP-date) that asks for
longer wins, capped at `max_backoff_s`. Any other HTTP error, a 200 whose body is not JSON or a response
without the chat-completion shape fails the row at once. A row whose request never succeeds becomes
label_status "failed" with the reason, and the batch completes. Posts, retries and errors by kind are
counted (`http_stats`, reported as judge counters). The API key comes from the env var named in the config;
it is sent only in the Authorization header and scrubbed from every error message and critique we keep.

`timeout_s` is httpx's per-operation timeout (connect, each read, each write), not a wall-clock bound on a
whole response: a server that keeps trickling bytes keeps a request alive.

`guided=True` sends vLLM's `structured_outputs` request field (vLLM servers only; other providers reject or
ignore it). With a reasoning model, start the server with `--reasoning-parser` so the grammar applies after
the thinking; the server then returns the thinking in `message.reasoning` (older: `reasoning_content`), which
we wrap in <think>...</think> so the parser and the cache see the whole critique.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import httpx

from actprm_ray.label.base import LabelBudget
from actprm_ray.label.cache import LabelCache
from actprm_ray.label.judge import Generation, JudgeConfig, JudgeLabeler
from actprm_ray.label.prompt import guided_regex

_RETRY_STATUS = frozenset({408, 425, 429}) | frozenset(range(500, 600))
_SNIPPET_CHARS = 300
_GAVE_UP = "gave up after"


class RateLimiter:
    """Thread-safe start-time spacing: at most `qps` calls to wait() return per second (qps <= 0: no limit)."""

    def __init__(self, qps: float):
        self.interval = 1.0 / qps if qps > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


def _retry_after_s(resp: httpx.Response) -> float:
    """Seconds the server asks us to wait (RFC 9110: delay-seconds or an HTTP-date); 0 when absent or unreadable."""
    value = resp.headers.get("retry-after", "").strip()
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0  # unreadable: our own backoff applies
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class MalformedResponse(ValueError):
    """A 200 response without the chat-completion shape we read."""


def _generation_from(data) -> Generation:
    """The critique, token usage and finish reason of a chat-completion response; MalformedResponse otherwise."""
    try:
        choice = data["choices"][0]
        message = choice["message"]
        content = message.get("content") or ""
        reasoning = message.get("reasoning") or message.get("reasoning_content") or ""
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        generated_tokens = int(usage.get("completion_tokens") or 0)
        finish_reason = choice.get("finish_reason") or ""
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        raise MalformedResponse(f"{type(e).__name__}: {e}") from None
    if not isinstance(content, str) or not isinstance(reasoning, str) or not isinstance(finish_reason, str):
        raise MalformedResponse("content, reasoning and finish_reason must be strings")
    if reasoning:
        # Thinking returned apart from the answer; a missing answer leaves the <think> open, which the parser
        # reports as an unfinished thought instead of reading the draft tags inside it.
        text = f"<think>{reasoning}</think>{content}" if content else f"<think>{reasoning}"
    else:
        text = content
    return Generation(text=text, prompt_tokens=prompt_tokens, generated_tokens=generated_tokens,
                      finish_reason=finish_reason)


class HttpJudgeLabeler(JudgeLabeler):
    """Judge labeler over HTTP; settings in config.http (HttpJudgeConfig)."""

    source_prefix = "http"

    def __init__(self, config: JudgeConfig, budget: LabelBudget | None = None, cache: LabelCache | None = None):
        super().__init__(config, budget, cache)
        h = config.http
        self.url = h.base_url.rstrip("/") + "/chat/completions"
        self.model_name = h.model or config.model
        self._api_key = ""
        if h.api_key_env:
            self._api_key = os.environ.get(h.api_key_env, "")
            if not self._api_key:
                raise ValueError(f"judge.http.api_key_env names {h.api_key_env!r}, which is not set or empty")
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self.client = httpx.Client(
            timeout=h.timeout_s,
            headers=headers,
            limits=httpx.Limits(max_connections=h.max_concurrency, max_keepalive_connections=h.max_concurrency),
        )
        self.limiter = RateLimiter(h.qps)
        self._pool = ThreadPoolExecutor(max_workers=max(1, h.max_concurrency), thread_name_prefix="judge-http")
        self._stats_lock = threading.Lock()
        self.http_stats: Counter = Counter()  # posts, retries, and errors by kind

    def __repr__(self) -> str:  # keep the client (and its auth header) out of any repr
        return f"HttpJudgeLabeler(judge_id={self.config.judge_id!r}, url={self.url!r})"

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.client.close()

    def counters(self) -> Counter:
        with self._stats_lock:
            http = Counter({f"http_{k}": v for k, v in self.http_stats.items()})
        return super().counters() + http

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _count(self, name: str) -> None:
        with self._stats_lock:
            self.http_stats[name] += 1

    def _body(self, prompt: str, seed: int, num_steps: int) -> dict:
        cfg = self.config
        body = {
            "model": self.model_name,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_tokens": cfg.max_tokens,
            "seed": seed,
            "n": 1,
        }
        if cfg.guided:
            body["structured_outputs"] = {"regex": guided_regex(num_steps, cfg.guided_max_analysis_chars)}
        return body

    def _post(self, body: dict) -> tuple[dict | None, str | None]:
        """(response JSON, None) on success, else (None, reason). Retries are bounded and counted."""
        h = self.config.http
        error = "no request made"
        for attempt in range(h.max_retries + 1):
            if attempt:
                self._count("retries")
            self.limiter.wait()
            self._count("posts")
            wait_hint = 0.0
            try:
                resp = self.client.post(self.url, json=body)
            except httpx.TimeoutException as e:
                error = f"timeout after {h.timeout_s}s ({type(e).__name__})"
                self._count("timeouts")
            except httpx.RequestError as e:  # transport errors (refused, reset, closed mid-body) and bad encodings
                error = f"connection error ({type(e).__name__}: {e})"
                self._count("connection_errors")
            else:
                if resp.status_code == 200:
                    try:
                        return resp.json(), None
                    except ValueError:
                        self._count("not_json")
                        snippet = resp.text[:_SNIPPET_CHARS]
                        return None, self._redact(f"HTTP 200 with a body that is not JSON: {snippet!r}")
                error = f"HTTP {resp.status_code}: {resp.text[:_SNIPPET_CHARS]!r}"
                self._count(f"http_{resp.status_code}")
                if resp.status_code not in _RETRY_STATUS:
                    return None, self._redact(error)
                wait_hint = _retry_after_s(resp)
            if attempt < h.max_retries:
                time.sleep(min(h.max_backoff_s, max(h.backoff_s * 2**attempt, wait_hint)))
        return None, self._redact(f"{_GAVE_UP} {h.max_retries + 1} tries; last error: {error}")

    def _one(self, prompt: str, seed: int, num_steps: int) -> Generation:
        data, error = self._post(self._body(prompt, seed, num_steps))
        if error is not None:
            # Retries exhausted on a retryable error (5xx, 429, timeout, connection): the judge is down, not the
            # row bad, so it is transient. Anything else (HTTP 400, a body that is not JSON) is permanent.
            return Generation("", 0, 0, error=f"http judge failed: {error}", transient=error.startswith(_GAVE_UP))
        try:
            gen = _generation_from(data)
        except MalformedResponse as e:
            snippet = str(data)[:_SNIPPET_CHARS]
            self._count("malformed")
            return Generation("", 0, 0, error=self._redact(f"http judge failed: malformed response ({e}) {snippet!r}"))
        if not gen.prompt_tokens and not gen.generated_tokens:
            self._count("usage_missing")
        # The critique is cached and logged: a server that echoes our key into it must not get it written anywhere.
        gen.text = self._redact(gen.text)
        return gen

    def generate(self, prompts: list[str], seeds: list[int], num_steps: list[int]) -> list[Generation]:
        return list(self._pool.map(self._one, prompts, seeds, num_steps))

    def generate_iter(self, prompts: list[str], seeds: list[int], num_steps: list[int]):
        # Requests finish one by one: hand each back at once, so the caller records it in the ledger before the
        # slowest returns. A new request starts only after the caller has taken (and recorded) an answer: at any
        # moment at most max_concurrency requests are paid but unrecorded, which bounds what a crash re-pays.
        # (Submitting all at once let answers pile up behind a slow ledger write: CI re-paid more than that.)
        window = max(1, self.config.http.max_concurrency)
        todo = iter(enumerate(zip(prompts, seeds, num_steps)))
        running: dict = {}

        def submit_next() -> None:
            for i, (p, s, n) in todo:
                running[self._pool.submit(self._one, p, s, n)] = i
                return

        for _ in range(window):
            submit_next()
        while running:
            f = next(as_completed(running))
            i = running.pop(f)
            yield i, f.result()
            submit_next()
