"""RunLedger: the run's append-only record of what was granted, paid and decided, on the run's storage.

Everything a restart needs lives here, never only in an actor's memory or on a pod's disk:
  * `grants/`  -- label keys the budget granted (written by the coordinator before it answers);
  * `labels/`  -- every judge response the moment it arrives (written by the labeler): the label cache;
  * `outcomes/` -- row outcomes (written by the trainer with each checkpoint);
  * `shards/`  -- the filter job's finished shards with their counts (written by its driver, last).

Storage is any pyarrow filesystem: a local path in tests, `s3://...`, `gs://...` or a shared volume on a
cluster. Each append is one new Parquet file with a unique name, written to a temporary name and then moved
(local/NFS: atomic rename; object stores: a PUT is atomic), so a writer killed mid-write leaves no half file
and concurrent writers never collide. Readers list the folder and merge the parts; `compact` folds a finished
run's parts into one file. Nothing is ever rewritten in place.
"""

from __future__ import annotations

import os
import time
import uuid
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from actprm_ray.data.shards import filesystem


class LedgerFolder:
    """One append-only folder of Parquet parts with a fixed schema; picklable (the filesystem is rebuilt)."""

    def __init__(self, uri: str, schema: pa.Schema):
        self.uri, self.schema = str(uri), schema
        self.fs, self.root = filesystem(self.uri)
        self.fs.create_dir(self.root, recursive=True)

    def __getstate__(self):
        return {"uri": self.uri, "schema": self.schema}

    def __setstate__(self, state):
        self.__init__(state["uri"], state["schema"])

    def append(self, rows: list[dict], tag: str = "part") -> str | None:
        """Write rows as one new part; returns its name (None for no rows)."""
        if not rows:
            return None
        # Time first, so a sorted listing is (nearly) write order; pid + uuid make names unique across writers.
        name = f"{time.time_ns():020d}-{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = f"{self.root}/.tmp-{name}"
        table = pa.Table.from_pylist(rows, schema=self.schema)
        with self.fs.open_output_stream(tmp) as out:
            pq.write_table(table, out)
        self.fs.move(tmp, f"{self.root}/{name}")
        return name

    def part_names(self) -> list[str]:
        selector = pafs.FileSelector(self.root, allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector)
                      if info.type == pafs.FileType.File and info.base_name.endswith(".parquet")
                      and not info.base_name.startswith("."))

    def read_parts(self, names: list[str]) -> pa.Table:
        tables = []
        for name in names:
            with self.fs.open_input_file(f"{self.root}/{name}") as f:
                tables.append(pq.read_table(f, schema=self.schema))
        return pa.concat_tables(tables) if tables else self.schema.empty_table()

    def read(self) -> pa.Table:
        return self.read_parts(self.part_names())

    def compact(self) -> int:
        """Fold every part into one (write the merged part first, then delete the old ones); returns parts folded.

        Run it only when no writer is active (the end of a run): a part written during compaction is kept."""
        names = self.part_names()
        if len(names) <= 1:
            return 0
        merged = self.read_parts(names)
        self.append(merged.to_pylist(), tag="compact")
        for name in names:
            self.fs.delete_file(f"{self.root}/{name}")
        return len(names)


GRANT_SCHEMA = pa.schema([
    ("key", pa.string()),  # label key (content hash) or "oracle:<row id>"
    ("cached", pa.bool_()),  # served from the label cache: granted, but no judge request
    ("granted_at", pa.float64()),
])


def run_ledger_uri(run_dir: str | os.PathLike) -> str:
    return f"{run_dir}/ledger"


def grants_folder(ledger_uri: str) -> LedgerFolder:
    return LedgerFolder(f"{ledger_uri}/grants", GRANT_SCHEMA)


SHARD_SCHEMA = pa.schema([
    ("key", pa.string()),  # part-NNNNN
    ("shard", pa.string()),  # the input file
    ("read", pa.int64()), ("scored", pa.int64()), ("retained", pa.int64()), ("discarded", pa.int64()),
    ("invalid", pa.int64()),
    ("invalid_reasons", pa.string()),  # JSON object: reason kind -> count
])


def shards_folder(ledger_uri: str) -> LedgerFolder:
    return LedgerFolder(f"{ledger_uri}/shards", SHARD_SCHEMA)
