"""What `train.replay` draws from: the rows one trainer rank has trained on, with the labels it trained them on.

Labels, not compute, are the judge bill, so the streaming trainer may train each paid label more than once
(docs/RESULTS.md, recipe probes round 3). The buffer keeps every trained row until it holds
`train.replay_buffer_rows`, then a uniform sample of all rows trained so far (reservoir sampling, Vitter's
algorithm R): memory and each checkpoint's replay file stay bounded on a million-row pool. Token ids are kept as
int32 arrays (a Python list of ints costs ~9x more). Every random choice is seeded by (run seed, rank, a count
kept with the buffer), so a worker restored from a checkpoint keeps and draws what the lost one would have.
No Ray: unit-tested directly.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actprm_ray.train.step import inline_labels

SCHEMA = pa.schema([("id", pa.string()), ("input_ids", pa.list_(pa.int64())),
                    ("readout_positions", pa.list_(pa.int64())), ("hard_labels", pa.list_(pa.int64()))])
_SEEN = b"rows_seen"  # Parquet metadata: rows offered to the buffer, the reservoir's count


def replay_row(row: dict, inline: bool) -> dict:
    """What replay needs of a trained row: its tokens and the labels it was trained on (inline: the oracle's)."""
    m = len(row["readout_positions"])
    labels = (inline_labels(int(row["oracle_first_error_step"]), m) if inline else
              [int(y) for y in row["hard_labels"]])
    return {"id": str(row["id"]), "input_ids": np.asarray(row["input_ids"], dtype=np.int32),
            "readout_positions": np.asarray(row["readout_positions"], dtype=np.int32),
            "hard_labels": np.asarray(labels, dtype=np.int64)}


class ReplayBuffer:
    def __init__(self, capacity: int, seed: int, rank: int):
        if capacity < 1:
            raise ValueError(f"replay buffer capacity {capacity}: must be >= 1")
        self.capacity, self.seed, self.rank = capacity, seed, rank
        self.rows: list[dict] = []
        self.seen = 0  # rows offered so far; len(rows) == min(seen, capacity)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: dict) -> None:
        """Offer one trained row (a replay_row): kept while there is room, then with probability capacity/seen,
        in place of a uniformly chosen kept row."""
        self.seen += 1
        if len(self.rows) < self.capacity:
            self.rows.append(row)
            return
        j = random.Random(f"{self.seed}:{self.rank}:keep:{self.seen}").randrange(self.seen)
        if j < self.capacity:
            self.rows[j] = row

    def draw(self, size: int, draw: int) -> list[dict]:
        """Up to `size` kept rows, without replacement; `draw` numbers the draws of this run (kept in the trainer
        state), so a resumed run repeats them."""
        rng = random.Random(f"{self.seed}:{self.rank}:{draw}")
        return rng.sample(self.rows, min(size, len(self.rows)))

    def save(self, path: Path) -> None:
        table = pa.Table.from_pylist(self.rows, schema=SCHEMA)
        pq.write_table(table.replace_schema_metadata({_SEEN: str(self.seen)}), path)

    @classmethod
    def load(cls, path: Path, capacity: int, seed: int, rank: int) -> ReplayBuffer:
        """A saved buffer (a missing file: an empty one). Saved under a larger capacity, it keeps its first
        `capacity` rows: the rest of the run samples into those."""
        buf = cls(capacity, seed, rank)
        if path.exists():
            table = pq.read_table(path)
            meta = table.schema.metadata or {}
            buf.rows = [replay_row(r, inline=False) for r in table.slice(0, capacity).to_pylist()]
            buf.seen = max(int(meta.get(_SEEN, len(buf.rows))), len(buf.rows))
        return buf
