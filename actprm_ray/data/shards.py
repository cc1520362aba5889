"""Reading trajectory shards (Parquet / JSONL; a file or a folder, local or any pyarrow URI) row by row: the one
pool reader of every job (the loop, the filter, the label job, supervised training). `resolve_pool` names a run's
pool, materialising the embedded synthetic one when none is configured.

Every row of the input comes out, a bad one too: a row that cannot be read (bad JSON, not UTF-8, not an object,
a missing or unusable id, a missing required field, an id seen before, a value of the wrong type) carries a
`read_error`, which makes it `invalid_input` downstream. A row without a usable id of its own is named by its
locator `<file>#<row>` (`#<line>` for JSONL, 0-based) so the outcome points at it. Checking the values
themselves (empty steps, ranges, length) is CanonicalizeStage's job.

Why the reader checks types: Ray Data gives each block its own Arrow type per column and unifies differing
types when a batch spans blocks, converting values on the way (a string question next to a binary one comes
out as bytes, in the *good* rows). So the columns leave the reader with one type each, in every block:
question a string, steps a list of strings, first_error_step an int, selected a bool, and the label columns
supervised training reads (LABEL_COLUMNS): hard_labels a list of ints, label_source and label_key strings,
judge_tokens and judge_prompt_tokens ints; or null. A row whose value has another type is invalid, with the
value nulled; so is text with a NUL or an unpaired surrogate (Arrow cannot hold the latter), with the reason
CanonicalizeStage would give.

    shards, sorted by path -> chunks: fixed row ranges of one shard, planned on the driver
      -> read_chunk (a Ray Data map over chunk descriptors) -> rows + read_error

`index_pool` is the driver's pass over the ids: the ids every row will carry (the accounting identity needs
them before the run) and the later occurrences of repeated ids. A repeated id is a bad row because outcomes,
labels and resume are all keyed by id: the first occurrence in file order keeps it, every later one is
`duplicate id`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from itertools import groupby, islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from actprm_ray.data.step_format import StepFormatError, check_text, check_types, parse_first_error_step, parse_int

if TYPE_CHECKING:  # annotations only: config imports data's step format, so data/ never imports config at run time
    from actprm_ray.config import Config

POOL_COLUMNS = ("id", "question", "steps", "first_error_step")
# A labelled set's columns (the label job writes them), read by supervised training; each null where a row lacks it.
LABEL_COLUMNS = ("hard_labels", "label_source", "label_key", "judge_tokens", "judge_prompt_tokens")
_STRING_COLUMNS = ("label_source", "label_key")
_INT_COLUMNS = ("judge_tokens", "judge_prompt_tokens")
REQUIRED_COLUMNS = ("id", "question", "steps")
SHARD_SUFFIXES = (".parquet", ".jsonl", ".json")
# Rows per read task in the loop and the label job (the filter sets its own). A Parquet chunk decodes its whole
# row group, so this trades read amplification (row group / chunk rows) against the rows one task holds.
POOL_CHUNK_ROWS = 1024
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


@dataclass(frozen=True)
class Chunk:
    """A fixed row range of one shard. Parquet: rows [offset, offset+rows) of a row group; JSONL: the first
    `rows` non-blank lines that start in bytes [byte_start, byte_end), the first of them on line first_line."""

    shard: int
    chunk: int
    path: str
    fmt: str  # parquet | jsonl
    rows: int
    row_group: int = -1
    offset: int = 0
    byte_start: int = 0
    byte_end: int = 0
    first_line: int = 0


def resolve_pool(cfg: Config, run_dir: Path) -> str:
    """Return the pool path; materialise the synthetic pool (deterministic from its seed) when none is given."""
    if cfg.data.pool:
        return cfg.data.pool
    from actprm_ray.data.synthetic import MIXES, generate_pool, write_pool

    d = cfg.data
    mix = "" if d.synthetic_mix == "default" else f"_{d.synthetic_mix}"  # default: the file name it always had
    path = run_dir / f"synthetic_pool_{d.synthetic_rows}_{d.synthetic_seed}{mix}.parquet"
    if not path.exists():
        write_pool(generate_pool(d.synthetic_rows, seed=d.synthetic_seed, mix=MIXES[d.synthetic_mix]), path)
    return str(path)


# -- file systems and planning ------------------------------------------------------------------------------------
def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def list_shards(uri: str) -> list[str]:
    """A Parquet/JSONL file, or every such file under a folder (recursively, hidden/underscore files skipped), sorted."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input not found: {uri}")
    if info.type == pafs.FileType.File:
        return [uri if "://" in uri else path]
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    shards = sorted(f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(SHARD_SUFFIXES)
                    and not any(part.startswith((".", "_")) for part in f.path[len(path):].split("/") if part))
    if not shards:
        raise FileNotFoundError(f"no .parquet/.jsonl shards under {uri}")
    # A URI shard is the input URI plus the path below it (keeps scheme, host and bucket exactly as given).
    return [uri.rstrip("/") + s[len(path.rstrip("/")):] if "://" in uri else s for s in shards]


def _fmt(path: str) -> str:
    return "parquet" if path.endswith(".parquet") else "jsonl"


def plan_chunks(shard: int, path: str, chunk_rows: int) -> list[Chunk]:
    """Split one shard into chunks of at most chunk_rows rows; reads only Parquet metadata, or scans JSONL once.

    A file that is not Parquet at all fails here, naming the file: its rows cannot even be counted."""
    fs, p = filesystem(path)
    chunks: list[Chunk] = []
    if _fmt(path) == "parquet":
        try:
            with fs.open_input_file(p) as f:
                meta = pq.ParquetFile(f).metadata
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise ValueError(f"{path}: not a readable Parquet file ({e})") from e
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            for off in range(0, n, chunk_rows):
                chunks.append(Chunk(shard, len(chunks), path, "parquet", min(chunk_rows, n - off), row_group=rg,
                                    offset=off))
        return chunks
    start = pos = rows = line = first = 0
    with fs.open_input_stream(p) as f:
        for raw in _iter_lines(f):
            if raw.strip():
                if rows == chunk_rows:
                    chunks.append(Chunk(shard, len(chunks), path, "jsonl", rows, byte_start=start, byte_end=pos,
                                        first_line=first))
                    start, rows, first = pos, 0, line
                rows += 1
            pos += len(raw)
            line += 1
    if rows:
        chunks.append(Chunk(shard, len(chunks), path, "jsonl", rows, byte_start=start, byte_end=pos, first_line=first))
    return chunks


def _iter_lines(stream, block: int = 1 << 20):
    """Binary lines (newline included) of a pyarrow input stream, read in 1 MiB blocks."""
    rest = b""
    while True:
        data = stream.read(block)
        if not data:
            break
        lines = (rest + data).split(b"\n")
        rest = lines.pop()
        for ln in lines:
            yield ln + b"\n"
    if rest:
        yield rest


def _take(chunks: list[Chunk], limit: int | None) -> list[Chunk]:
    """The chunks holding the first `limit` rows (in shard order), the last one cut short."""
    if limit is None:
        return chunks
    out, left = [], limit
    for c in chunks:
        if left <= 0:
            break
        out.append(c if c.rows <= left else replace(c, rows=left))
        left -= out[-1].rows
    return out


# -- rows -----------------------------------------------------------------------------------------------------------
def _chunk_records(c: Chunk, columns: tuple[str, ...]):
    """(locator, record, error) for every row of a chunk; Parquet reads only `columns` (those the file has)."""
    fs, p = filesystem(c.path)
    name = p.rsplit("/", 1)[-1]
    if c.fmt == "parquet":
        with fs.open_input_file(p) as f:
            pf = pq.ParquetFile(f)
            present = [col for col in columns if col in pf.schema_arrow.names]
            table = pf.read_row_group(c.row_group, columns=present).slice(c.offset, c.rows)
        first = sum(pf.metadata.row_group(g).num_rows for g in range(c.row_group)) + c.offset
        for j, rec in enumerate(table.to_pylist()):
            yield f"{name}#{first + j}", rec, ""
        return
    with fs.open_input_file(p) as f:
        f.seek(c.byte_start)
        data = f.read(c.byte_end - c.byte_start)
    lines = ((j, raw) for j, raw in enumerate(data.split(b"\n")) if raw.strip())
    for j, raw in islice(lines, c.rows):
        line = c.first_line + j
        try:
            yield f"{name}#{line}", json.loads(raw), ""
        except UnicodeDecodeError as e:
            yield f"{name}#{line}", None, f"line {line + 1} is not valid UTF-8 ({e.reason} at byte {e.start})"
        except json.JSONDecodeError as e:
            yield f"{name}#{line}", None, f"bad JSON on line {line + 1}: {e.msg} (column {e.colno})"


def _id_error(rec, error: str) -> str:
    """Why a record cannot keep its own id ("" if it can); decided from the id alone, so that index_pool, which
    reads only the id column of a Parquet shard, assigns the same ids as read_chunk."""
    if error:
        return error
    if not isinstance(rec, dict):
        return f"row is a JSON {_JSON_TYPES.get(type(rec), type(rec).__name__)}, not an object"
    if "id" not in rec:
        return "missing id"
    rid = rec["id"]
    if rid is None:
        return "id is null"
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return f"id must be a string or an integer, got {type(rid).__name__}"
    return "" if str(rid).strip() else "id is empty"


def _own_id(locator: str, rec, error: str) -> tuple[str, str]:
    """(id, error): the row's own id, or its locator and why it cannot keep its id."""
    error = _id_error(rec, error)
    return (locator if error else str(rec["id"])), error


def read_chunk(batch: dict, *, columns: tuple[str, ...] = POOL_COLUMNS,
               duplicates: dict[str, str] | None = None) -> dict:
    """Chunk descriptors -> rows: `columns` (None where a row lacks one) + read_error + shard/chunk/chunk_rows.

    `duplicates` maps the locator of a repeated id to the locator of its first occurrence (index_pool)."""
    duplicates = duplicates or {}
    cols: dict[str, list] = {c: [] for c in (*columns, "read_error", "shard", "chunk", "chunk_rows")}
    for i in range(len(batch["shard"])):
        c = Chunk(**{k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()})
        for where, rec, error in _chunk_records(c, columns):
            rid, error = _own_id(where, rec, error)
            if where in duplicates:
                rid, error = where, f"duplicate id {rid!r} (first at {duplicates[where]})"
            rec = rec if isinstance(rec, dict) else {}
            missing = [col for col in REQUIRED_COLUMNS if col not in rec]
            if not error and missing:
                error = f"missing {', '.join(missing)}"
            values = {}
            if not error:
                try:
                    values = _checked_values(rec, columns)
                except StepFormatError as e:
                    error = str(e)
            for col in columns:
                cols[col].append(rid if col == "id" else values.get(col))
            cols["read_error"].append(error)
            cols["shard"].append(c.shard)
            cols["chunk"].append(c.chunk)
            cols["chunk_rows"].append(c.rows)
    return {k: np.asarray(v) if k in ("read_error", "shard", "chunk", "chunk_rows") else _obj(v)
            for k, v in cols.items()}


def _checked_values(rec: dict, columns: tuple[str, ...]) -> dict:
    """The row's values of `columns`, each of its column's one type or None (module docstring); raises
    StepFormatError with the same reasons CanonicalizeStage gives, in the same order."""
    out = {c: rec.get(c) for c in columns if c != "id"}
    if "first_error_step" in out:
        out["first_error_step"] = parse_first_error_step(out["first_error_step"])
    out["steps"] = check_types(out["question"], out["steps"])
    # Arrow cannot hold an unpaired surrogate: one such string would turn the whole block into pandas, which the
    # trainer's batcher cannot mix with Arrow. (Empty steps: CanonicalizeStage reports that first.)
    if out["steps"]:
        for i, step in enumerate(out["steps"]):
            check_text(step, f"step {i}")
        check_text(out["question"], "question")
    if "selected" in out and not isinstance(out["selected"], (bool, type(None))):
        v = out["selected"]
        raise StepFormatError(f"selected must be true or false, got {type(v).__name__} {v!r}")
    if "hard_labels" in out:
        out["hard_labels"] = _int_list(out["hard_labels"], "hard_labels")
    for c in _STRING_COLUMNS:
        if c in out and not isinstance(out[c], (str, type(None))):
            raise StepFormatError(f"{c} must be a string, got {type(out[c]).__name__}")
    for c in _INT_COLUMNS:
        if c in out:
            out[c] = parse_int(out[c], c)
    return out


def _int_list(value, name: str) -> list[int] | None:
    """A list of whole numbers (their range is the reader of the column's job), or None."""
    if value is None:
        return None
    # A string or mapping is iterable too, but not a list of labels ("110" would read as three).
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise StepFormatError(f"{name} must be a list of integers, got {type(value).__name__}")
    out = []
    for j, v in enumerate(value):
        k = parse_int(v, f"{name}[{j}]")
        if k is None:  # a missing label inside a list is not a missing list
            raise StepFormatError(f"{name}[{j}] must be an integer, got {type(v).__name__} {v!r}")
        out.append(k)
    return out


def _obj(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


# -- the driver's index and the Ray Data source ----------------------------------------------------------------------
@dataclass
class PoolIndex:
    chunks: list[Chunk]
    ids: list[str]  # the id each row will carry, in file order: the rows read, for the accounting identity
    duplicates: dict[str, str]  # locator of a later occurrence of an id -> locator of its first occurrence


def index_pool(path: str, *, limit: int | None = None, chunk_rows: int = POOL_CHUNK_ROWS) -> PoolIndex:
    """Plan the chunks of every shard under `path` (the first `limit` rows) and read their ids once."""
    chunks = []
    for i, shard in enumerate(list_shards(path)):
        chunks.extend(plan_chunks(i, shard, chunk_rows))
    chunks = _take(chunks, limit)
    ids: list[str] = []
    first: dict[str, str] = {}
    duplicates: dict[str, str] = {}
    for where, rec, error in _id_records(chunks):
        rid, error = _own_id(where, rec, error)
        if not error and rid in first:
            duplicates[where] = first[rid]
            rid = where
        first.setdefault(rid, where)
        ids.append(rid)
    return PoolIndex(chunks, ids, duplicates)


def _id_records(chunks: list[Chunk]):
    """_chunk_records of the id column for every chunk, reading each Parquet row group once (its chunks are
    consecutive row ranges, read as one)."""
    for _, group in groupby(chunks, key=lambda c: (c.path, c.row_group)):
        group = list(group)
        if group[0].fmt == "parquet":
            group = [replace(group[0], rows=sum(c.rows for c in group))]
        for c in group:
            yield from _chunk_records(c, ("id",))


def read_pool_rows(index: PoolIndex, *, num_cpus: float, columns: tuple[str, ...] = POOL_COLUMNS,
                   max_retries: int | None = None):
    """A Ray Dataset of every row of an indexed pool (see read_chunk), one read task per chunk; `max_retries`
    bounds re-runs of a read task whose worker died (None: Ray's)."""
    import ray.data

    retry = {} if max_retries is None else {"max_retries": max_retries}
    ds = ray.data.from_items([asdict(c) for c in index.chunks], override_num_blocks=max(1, len(index.chunks)))
    return map_batches(ds, read_chunk, batch_size=None, batch_format="numpy", num_cpus=num_cpus, zero_copy_batch=False,
                       fn_kwargs={"columns": columns, "duplicates": index.duplicates}, **retry)


def map_batches(ds, fn, **kwargs):
    """`ds.map_batches(fn, **kwargs)` without Ray 2.60's `ray_remote_args` deprecation warning: the run's fault
    settings (max_retries, max_restarts, max_task_retries) have no named parameter yet, so they still go as remote
    args, and the warning would print once per stage on every run. Ray is pinned; recheck on an upgrade."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(fn, **kwargs)
