"""Content-hash label cache (METHOD §12), kept in the run ledger: a rerun never pays twice for the same judgement.

Key = sha256 over (canonical question, canonical steps, judge id, prompt version, sampling params), as canonical
JSON. The stored value is the judge's critique plus what we derived from it (k, status, reason) and what it cost,
INVALID results included: a critique that failed to parse was still paid for. A transient failure (the judge
could not be reached after the HTTP retries, the engine died) is recorded too, with status "transient", but is
never served as a hit: a rerun asks again.

Storage is a ledger folder (actprm_ray/ledger.py) on any pyarrow filesystem: one Parquet part per write, merged
on read. A process, pod or machine pointed at the same folder sees every label any of them paid for; there is
no file lock, so several labelers on several nodes write at once, and a shared volume or an object store works.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import asdict, dataclass

import pyarrow as pa

from actprm_ray.ledger import LedgerFolder

OK, FAILED, TRANSIENT = "ok", "failed", "transient"


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
    """One stored judgement. status: "ok", "failed" (INVALID, permanent) or "transient" (not a judgement: the
    judge was unreachable); k is the first error step or NO_LABEL."""

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


LABEL_SCHEMA = pa.schema([
    ("key", pa.string()), ("status", pa.string()), ("k", pa.int64()), ("reason", pa.string()),
    ("critique", pa.string()), ("source", pa.string()), ("num_steps", pa.int64()), ("prompt_tokens", pa.int64()),
    ("generated_tokens", pa.int64()), ("attempts", pa.int64()), ("mismatch", pa.bool_()),
    ("created_at", pa.float64()),
])


class LabelCache:
    """Durable key -> CacheEntry store in a ledger folder (a local path or a pyarrow URI); picklable.

    Each process keeps an index of the parts it has read and reads only new parts on a lookup, so the cost of
    a lookup is one listing plus the parts written since. A later judgement of the same key wins.
    """

    def __init__(self, path):
        self.folder = LedgerFolder(str(path), LABEL_SCHEMA)
        self.path = self.folder.uri
        self._init_index()

    def _init_index(self) -> None:
        self._entries: dict[str, CacheEntry] = {}
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def refresh(self) -> None:
        """Read the parts written (by anyone) since the last refresh."""
        with self._lock:
            new = [n for n in self.folder.part_names() if n not in self._seen]
            if not new:
                return
            rows = self.folder.read_parts(new).to_pylist()
            for row in sorted(rows, key=lambda r: r["created_at"]):
                entry = CacheEntry(**row)
                old = self._entries.get(entry.key)
                if old is None or old.created_at <= entry.created_at:
                    self._entries[entry.key] = entry
            self._seen.update(new)

    def get_many(self, keys: list[str]) -> dict[str, CacheEntry]:
        """The stored judgements (ok or failed) for those keys that have one; transient records are not hits."""
        self.refresh()
        return {k: e for k in dict.fromkeys(keys) if (e := self._entries.get(k)) is not None and e.status != TRANSIENT}

    def latest(self, keys: list[str]) -> dict[str, CacheEntry]:
        """The newest record of each key, transient ones included."""
        self.refresh()
        return {k: self._entries[k] for k in dict.fromkeys(keys) if k in self._entries}

    def put_many(self, entries: list[CacheEntry]) -> None:
        """Append entries as one part (durable when this returns)."""
        if not entries:
            return
        now = time.time()
        rows = [{**asdict(e), "created_at": e.created_at or now} for e in entries]
        name = self.folder.append(rows, tag="labels")
        with self._lock:
            for row in rows:
                self._entries[row["key"]] = CacheEntry(**row)
            self._seen.add(name)

    def all_entries(self) -> list[CacheEntry]:
        self.refresh()
        return list(self._entries.values())

    def __len__(self) -> int:
        """Keys with a judgement (transient records excluded)."""
        return sum(1 for e in self.all_entries() if e.status != TRANSIENT)

    def stats(self) -> dict:
        """Counts by status and the tokens the stored judgements cost originally (what a rerun saves)."""
        out: dict[str, dict] = {}
        for e in self.all_entries():
            s = out.setdefault(e.status, dict(count=0, prompt_tokens=0, generated_tokens=0))
            s["count"] += 1
            s["prompt_tokens"] += e.prompt_tokens
            s["generated_tokens"] += e.generated_tokens
        return out

    def compact(self) -> int:
        with self._lock:
            folded = self.folder.compact()
            self._init_index()
        return folded

    def close(self) -> None:
        pass
