"""Content-hash label cache (METHOD §12): a rerun never pays twice for the same judgement.

Key = sha256 over (canonical question, canonical steps, judge id, prompt version, sampling params), as canonical
JSON. The stored value is the judge's critique plus what we derived from it (k, status, reason) and what it cost,
INVALID results included: a critique that failed to parse was still paid for.

Storage is one SQLite file in WAL mode, so several labeler actors (processes) on one node can read while one
writes. SQLite serialises writers with a file lock; a writer that meets the lock waits (busy_timeout) and we
retry a few more times on top, because Ray actors may all flush at the end of the same batch. A shared path on
a network filesystem is not supported by SQLite locking: use one cache file per node there.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path


def label_key(question: str, steps: list[str], judge_id: str, prompt_version: str, sampling: dict) -> str:
    """sha256 hex of the canonical JSON of everything that determines a judgement.

    Inputs must already be canonical (prompt.canonical_judge_input); `sampling` is any JSON-serialisable
    dict (temperature, top_p, max_tokens, seed, guided, ...). Key order in `sampling` does not matter.
    """
    payload = json.dumps(
        {"q": question, "steps": list(steps), "judge": judge_id, "prompt": prompt_version, "sampling": sampling},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass
class CacheEntry:
    """One stored judgement. status is "ok" or "failed" (INVALID); k is the first error step or NO_LABEL."""

    key: str
    status: str
    k: int
    reason: str
    critique: str
    source: str
    num_steps: int
    prompt_tokens: int
    generated_tokens: int
    attempts: int
    mismatch: bool = False
    created_at: float = 0.0


_COLUMNS = tuple(CacheEntry.__dataclass_fields__)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    key TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    k INTEGER NOT NULL,
    reason TEXT NOT NULL,
    critique TEXT NOT NULL,
    source TEXT NOT NULL,
    num_steps INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    generated_tokens INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    mismatch INTEGER NOT NULL,
    created_at REAL NOT NULL
)
"""
# SQLite caps the number of host parameters per statement (32766 in modern builds, 999 in old ones).
_CHUNK = 500


class LabelCache:
    """Durable key -> CacheEntry store in one SQLite file; picklable (it reconnects lazily in each process).

    Args:
        path: the SQLite file; parent folders are created.
        busy_timeout_s: how long one statement waits for another writer's lock.
        retries: extra attempts after a "database is locked" error, with a short growing sleep.
    """

    def __init__(self, path: str | os.PathLike, *, busy_timeout_s: float = 30.0, retries: int = 5):
        self.path = str(Path(path))
        self.busy_timeout_s, self.retries = busy_timeout_s, retries
        self._local = threading.local()
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._run(lambda c: c.execute(_SCHEMA))

    # Connections are per thread and per process: never pickle them into Ray actors.
    def __getstate__(self):
        return {"path": self.path, "busy_timeout_s": self.busy_timeout_s, "retries": self.retries}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _run(self, fn):
        for attempt in range(self.retries + 1):
            try:
                return fn(self._conn())
            except sqlite3.OperationalError as e:
                lock_error = "locked" in str(e) or "busy" in str(e)
                if not lock_error or attempt == self.retries:
                    raise
                time.sleep(0.05 * 2**attempt)

    def get_many(self, keys: list[str]) -> dict[str, CacheEntry]:
        """The stored entries for those keys that are present (missing keys are simply absent)."""
        found: dict[str, CacheEntry] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start:start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT {','.join(_COLUMNS)} FROM labels WHERE key IN ({marks})"
            for row in self._run(lambda c: c.execute(sql, chunk).fetchall()):
                entry = CacheEntry(*row)
                entry.mismatch = bool(entry.mismatch)
                found[entry.key] = entry
        return found

    def put_many(self, entries: list[CacheEntry]) -> None:
        """Insert or replace entries in one transaction (a later judgement of the same key wins)."""
        if not entries:
            return
        now = time.time()
        rows = [tuple(asdict(e).values()) for e in entries]
        rows = [r[:-1] + ((r[-1] or now),) for r in rows]
        sql = f"INSERT OR REPLACE INTO labels ({','.join(_COLUMNS)}) VALUES ({','.join('?' * len(_COLUMNS))})"

        def write(c: sqlite3.Connection):
            c.execute("BEGIN IMMEDIATE")
            try:
                c.executemany(sql, rows)
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

        self._run(write)

    def __len__(self) -> int:
        return self._run(lambda c: c.execute("SELECT COUNT(*) FROM labels").fetchone()[0])

    def stats(self) -> dict:
        """Counts by status and the tokens the stored judgements cost originally (what a rerun saves)."""
        rows = self._run(
            lambda c: c.execute(
                "SELECT status, COUNT(*), SUM(prompt_tokens), SUM(generated_tokens) FROM labels GROUP BY status"
            ).fetchall()
        )
        return {s: dict(count=n, prompt_tokens=p or 0, generated_tokens=g or 0) for s, n, p, g in rows}

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
