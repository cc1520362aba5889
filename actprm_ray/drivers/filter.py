"""The filter job: one-shot filtering of a large trajectory set with a fixed checkpoint (METHOD §8, stage 2), resumable per shard.

    input shards (Parquet / JSONL; a file, a folder, local or any pyarrow URI), sorted by path
      -> chunks: fixed row ranges of one shard (<= chunk_rows rows), planned on the driver
      -> read -> Canonicalize -> Score (actor pool, fixed checkpoint) -> Select      (Ray Data, streaming)
      -> driver: _work/part-NNNNN/chunk-*.parquet, and once every chunk of a shard is back:
           retained/part-NNNNN.parquet    valid rows the rule selects (what the judge labels next)
           discarded/part-NNNNN.parquet   valid rows it trusts (only with write_all)
           invalid/part-NNNNN.parquet     id + reason of rows that could not be scored
           ledger/shards/                 the shard's done-record with its counts, appended last (actprm_ray/ledger.py)
      -> filter_summary.json              counts over all shards (read, scored, retained, invalid, fraction)

Why chunks: a row's µ depends, in its last bits, on which rows share its forward batch (padded, or packed into one
line with pipeline.score_pack_tokens: the kernels' shapes change either way). A chunk is a fixed slice of one shard,
every pipeline call sees whole chunks (batch_size=None) and the scorer batches only inside a chunk, so each row is
scored with the same neighbours in every run, whatever happened before a kill. A shard's outputs are moved into
place before its done-record is written, so a rerun with the same output skips exactly the finished shards and the result
equals an uninterrupted run's. Memory is flat in the number of rows: the driver holds one chunk at a time, Ray
Data's object-store budget bounds what is in flight.

Bad rows (data/shards.py, CanonicalizeStage) go to invalid/ with their reason. Duplicate ids are not detected
here: that needs every id on the driver, and the filter keeps its memory flat. Each occurrence is scored on
its own; the label job and the loop, which account rows by id, turn later occurrences into invalid rows.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from actprm_ray.config import Config, run_directory
from actprm_ray.data.shards import Chunk, filesystem, list_shards, plan_chunks
from actprm_ray.drivers.run import init_ray_from, job_parser, parse_job_args
from actprm_ray.ledger import run_ledger_uri, shards_folder
from actprm_ray.pipeline.filter import (CHUNK_BLOCK_BYTES, DEFAULT_CHUNK_ROWS, INVALID_SCHEMA, OUTPUT_SCHEMA,
                                        build_filter_plan, checkpoint_version, reason_kind, resolve_model_dir)

FORMAT_VERSION = 1


@dataclass
class FilterArgs:
    """The filter's own command-line arguments (everything else is the shared Config)."""

    checkpoint: str = ""  # EnsemblePRM checkpoint (a loop checkpoint dir or its model/); "" = fresh heads on model.backbone
    input: str = ""  # Parquet/JSONL file or folder of shards, local or pyarrow URI; "" = the synthetic pool
    output: str = ""  # output folder (local or URI); "" = <run.output_dir>/<run.name>/filter
    write_all: bool = False  # also write the discarded (trusted) rows with their scores
    chunk_rows: int = DEFAULT_CHUNK_ROWS  # rows per chunk: the unit of scoring and of in-flight data
    model_version: int | None = None  # recorded on every row; None = the checkpoint's trainer_state.json, else 0


# -- output store ------------------------------------------------------------------------------------------------
class _Store:
    """The output folder through a pyarrow file system; writes land under a temporary name and are then moved."""

    def __init__(self, uri: str):
        self.fs, self.root = filesystem(uri)
        self.fs.create_dir(self.root, recursive=True)
        self.ledger_uri = run_ledger_uri(uri if "://" in uri else self.root)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_json(self, rel: str) -> dict:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return json.loads(f.read())

    def write_json(self, rel: str, obj: dict) -> None:
        self._mkparent(rel)
        tmp = self.path(rel) + ".tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(obj, indent=2, sort_keys=True).encode())
        self.fs.move(tmp, self.path(rel))

    def writer(self, rel: str, schema: pa.Schema) -> tuple[pq.ParquetWriter, str]:
        """A Parquet writer on `_tmp-<name>` (ignored by pyarrow.dataset readers) and the temporary path."""
        self._mkparent(rel)
        d, name = rel.rsplit("/", 1)
        tmp = self.path(d, f"_tmp-{name}")
        return pq.ParquetWriter(tmp, schema, filesystem=self.fs), tmp

    def move(self, tmp: str, rel: str) -> None:
        self.fs.move(tmp, self.path(rel))

    def write_table(self, rel: str, table: pa.Table) -> None:
        w, tmp = self.writer(rel, table.schema)
        w.write_table(table)
        w.close()
        self.move(tmp, rel)

    def read_table(self, rel: str) -> pa.Table:
        return pq.read_table(self.path(rel), filesystem=self.fs)

    def delete(self, rel: str) -> None:
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))

    def _mkparent(self, rel: str) -> None:
        if "/" in rel:
            self.fs.create_dir(self.path(rel.rsplit("/", 1)[0]), recursive=True)


def shard_key(i: int) -> str:
    return f"part-{i:05d}"


COUNTS = ("read", "scored", "retained", "discarded", "invalid")


def _finalize_shard(store: _Store, shard: int, path: str, n_chunks: int, write_all: bool) -> dict:
    """Merge a finished shard's chunk files (in chunk order) into its outputs; append its done-record last."""
    key = shard_key(shard)
    outs = {"retained": store.writer(f"retained/{key}.parquet", OUTPUT_SCHEMA),
            "invalid": store.writer(f"invalid/{key}.parquet", INVALID_SCHEMA)}
    if write_all:
        outs["discarded"] = store.writer(f"discarded/{key}.parquet", OUTPUT_SCHEMA)
    counts: Counter = Counter()
    reasons: Counter = Counter()
    for k in range(n_chunks):
        t = store.read_table(f"_work/{key}/chunk-{k:06d}.parquet")
        valid = np.asarray(t.column("valid").to_numpy(zero_copy_only=False), dtype=bool)
        selected = np.asarray(t.column("selected").to_numpy(zero_copy_only=False), dtype=bool) & valid
        retained, discarded = t.filter(pa.array(selected)), t.filter(pa.array(valid & ~selected))
        invalid = t.filter(pa.array(~valid))
        outs["retained"][0].write_table(retained.select(OUTPUT_SCHEMA.names))
        outs["invalid"][0].write_table(invalid.select(INVALID_SCHEMA.names))
        if write_all:
            outs["discarded"][0].write_table(discarded.select(OUTPUT_SCHEMA.names))
        counts.update(read=t.num_rows, scored=int(valid.sum()), retained=retained.num_rows,
                      discarded=discarded.num_rows, invalid=invalid.num_rows)
        reasons.update(reason_kind(r) for r in invalid.column("invalid_reason").to_pylist())
    for name, (writer, tmp) in outs.items():
        writer.close()
        store.move(tmp, f"{name}/{key}.parquet")
    marker = {"key": key, "shard": path, **{k: counts[k] for k in COUNTS}, "invalid_reasons": json.dumps(dict(reasons))}
    shards_folder(store.ledger_uri).append([marker], tag="shard")
    store.delete(f"_work/{key}")
    return marker


def _fingerprint(cfg: Config, args: FilterArgs, shards: list[str], model_dir: Path, version: int) -> dict:
    """Everything that decides the output bits: a rerun into the same folder must match it exactly."""
    s = cfg.selection
    sizes = []
    for p in shards:
        fs, q = filesystem(p)
        sizes.append(fs.get_file_info(q).size)
    return {"format_version": FORMAT_VERSION, "shards": shards, "shard_bytes": sizes, "checkpoint": str(model_dir),
            "model_version": version, "chunk_rows": args.chunk_rows, "write_all": args.write_all,
            "selection": {"mode": s.mode, "delta_pred": s.delta_pred, "delta_std": s.delta_std,
                          "step_threshold": s.step_threshold, "unbiased_std": s.unbiased_std,
                          "random_rate": s.random_rate, "seed": s.seed},
            "max_length": cfg.model.max_length, "dtype": cfg.model.dtype,
            "score_batch_size": cfg.pipeline.score_batch_size}


def _defaults(cfg: Config, args: FilterArgs) -> FilterArgs:
    """The embedded default: synthetic pool and fresh heads on model.backbone, under <run.output_dir>/<run.name>."""
    run_dir = run_directory(cfg)
    output = args.output or str(run_dir / "filter")
    checkpoint, data = args.checkpoint, args.input
    if not checkpoint or not data:
        run_dir.mkdir(parents=True, exist_ok=True)
    if not checkpoint:
        from actprm_ray.drivers.active import prepare_initial_model

        checkpoint = str(prepare_initial_model(cfg, run_dir))
    if not data:
        from actprm_ray.data.shards import resolve_pool

        data = resolve_pool(cfg, run_dir)
    return FilterArgs(checkpoint=checkpoint, input=data, output=output, write_all=args.write_all,
                      chunk_rows=args.chunk_rows, model_version=args.model_version)


def run_filter(cfg: Config, args: FilterArgs, *, torch_threads: int | None = None) -> dict:
    """Score every row of args.input once with a fixed checkpoint, keep the uncertain ones; return the summary.

    Resumable: shards with a done-marker in args.output are skipped; a rerun must use the same settings.
    torch_threads pins the scorer's intra-op threads (benchmarks); None leaves Ray's default (its CPU share).
    """
    started = time.time()
    args = _defaults(cfg, args)
    if args.chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {args.chunk_rows}")
    model_dir = resolve_model_dir(args.checkpoint)
    version = checkpoint_version(model_dir) if args.model_version is None else args.model_version
    shards = list_shards(args.input)
    store = _Store(args.output)
    meta = json.loads(json.dumps(_fingerprint(cfg, args, shards, model_dir, version)))  # as it reads back
    if store.exists("_filter_meta.json"):
        old = store.read_json("_filter_meta.json")
        if old != meta:
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise ValueError(f"{args.output} holds a filter run with other settings ({', '.join(diff)}); "
                             "use a new --output or delete the old one")
    else:
        store.write_json("_filter_meta.json", meta)

    finished = {r["key"] for r in shards_folder(store.ledger_uri).read().to_pylist()}
    done = [i for i in range(len(shards)) if shard_key(i) in finished]
    pending = [i for i in range(len(shards)) if i not in set(done)]
    chunks: list[Chunk] = []
    n_chunks: dict[int, int] = {}
    for i in pending:
        store.delete(f"_work/{shard_key(i)}")  # leftovers of a killed run: redone from scratch
        planned = plan_chunks(i, shards[i], args.chunk_rows)
        n_chunks[i] = len(planned)
        chunks.extend(planned)
        if not planned:  # an empty shard is finished at once
            _finalize_shard(store, i, shards[i], 0, args.write_all)
    total_rows = sum(c.rows for c in chunks)
    print(f"[filter] {len(shards)} shards ({len(done)} already done), {total_rows} rows to score in {len(chunks)} "
          f"chunks -> {args.output}", flush=True)
    timing = {}
    if chunks:
        timing = _run_pipeline(cfg, args, store, shards, chunks, n_chunks, model_dir, version, total_rows,
                               torch_threads)
    store.delete("_work")
    summary = _summarize(store, shards, len(done), total_rows, time.time() - started, args, model_dir, version, cfg)
    summary["pipeline_timing"] = timing
    store.write_json("filter_summary.json", summary)
    return summary


def _run_pipeline(cfg, args, store, shards, chunks, n_chunks, model_dir, version, total_rows, torch_threads) -> dict:
    """Stream the chunks through the plan; write chunk files and finish shards as they complete. Returns timings:
    start-up (plan start to the first finished chunk: actors, model load) and the steady rate, measured over the
    second half of the rows so that start-up and the first chunks' queueing behind it cancel out."""
    import ray.data

    init_ray_from(cfg)
    plan = build_filter_plan(cfg, model_dir, version, torch_threads=torch_threads,
                             source=f"{len(chunks)} chunks of <= {args.chunk_rows} rows",
                             sink=f"driver: per-shard Parquet under {args.output}")
    print(f"[filter] plan:\n{plan.describe()}", flush=True)
    # One descriptor per block, so each read call emits exactly one chunk downstream; and a chunk must stay one
    # block (pipeline.block_size_kb is tuned for the loop's row-level backpressure and would split it). The
    # dataset's own context carries this, the process-wide one is left alone.
    source = ray.data.from_items([asdict(c) for c in chunks], override_num_blocks=len(chunks))
    if source.context.target_max_block_size is not None:
        source.context.target_max_block_size = max(source.context.target_max_block_size, CHUNK_BLOCK_BYTES)
    ds = plan.apply(source)

    expected = {(c.shard, c.chunk): c.rows for c in chunks}
    left = Counter(c.shard for c in chunks)
    pieces: dict[tuple[int, int], list[pa.Table]] = defaultdict(list)
    rows_done, t0, last = 0, time.time(), time.time()
    arrivals: list[tuple[float, int]] = []  # (time, rows done) after each finished chunk
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        keys = np.stack([table.column("shard").to_numpy(), table.column("chunk").to_numpy()], axis=1)
        for s, k in {tuple(int(x) for x in row) for row in keys}:
            mask = (keys[:, 0] == s) & (keys[:, 1] == k)
            pieces[(s, k)].append(table.filter(pa.array(mask)))
            got = sum(p.num_rows for p in pieces[(s, k)])
            if got > expected[(s, k)]:
                raise RuntimeError(f"chunk {k} of shard {s} came back with {got} rows, expected {expected[(s, k)]}")
            if got < expected[(s, k)]:
                continue  # a chunk split over blocks (huge rows): wait for the rest
            store.write_table(f"_work/{shard_key(s)}/chunk-{k:06d}.parquet", pa.concat_tables(pieces.pop((s, k))))
            rows_done += got
            arrivals.append((time.time(), rows_done))
            left[s] -= 1
            if left[s] == 0:
                _finalize_shard(store, s, shards[s], n_chunks[s], args.write_all)
        if time.time() - last >= cfg.pipeline.status_every_s:
            last = time.time()
            rate = rows_done / max(last - t0, 1e-9)
            print(f"[filter] {last - t0:7.0f}s rows {rows_done}/{total_rows} ({rate:.1f} rows/s), shards left "
                  f"{sum(1 for v in left.values() if v)}", flush=True)
    if pieces or any(left.values()):
        raise RuntimeError(f"pipeline ended with unfinished chunks: {sorted(pieces)[:5]}")
    end = time.time()
    mid = next((a for a in arrivals if a[1] >= total_rows / 2), None)
    steady = (rows_done - mid[1]) / (arrivals[-1][0] - mid[0]) if mid and arrivals[-1][0] > mid[0] else None
    return {"pipeline_s": end - t0, "startup_s": (arrivals[0][0] if arrivals else end) - t0,
            "steady_rows_per_s": steady}


def _summarize(store, shards, skipped, rows_this_run, wall_s, args, model_dir, version, cfg) -> dict:
    totals: Counter = Counter()
    reasons: Counter = Counter()
    records = {r["key"]: r for r in shards_folder(store.ledger_uri).read().to_pylist()}
    for i in range(len(shards)):
        m = records[shard_key(i)]  # a shard finished twice (a kill between record and clean-up) counts once
        totals.update({k: m[k] for k in COUNTS})
        reasons.update(json.loads(m["invalid_reasons"]))
    s = cfg.selection
    return {
        **{k: totals[k] for k in ("read", "scored", "retained", "discarded", "invalid")},
        # Of the rows that could be scored, the share kept for labelling (the paper's 563,030 / 1,061,763 = 53%).
        "retained_fraction": totals["retained"] / totals["scored"] if totals["scored"] else 0.0,
        "invalid_reasons": dict(reasons.most_common()),
        "shards": len(shards), "shards_skipped": skipped, "rows_scored_this_run": rows_this_run,
        "wall_time_s": wall_s, "rows_per_s_this_run": rows_this_run / max(wall_s, 1e-9),
        "model_version": version, "checkpoint": str(model_dir), "input": args.input, "output": args.output,
        "selection": {"mode": s.mode, "delta_pred": s.delta_pred, "delta_std": s.delta_std,
                      "step_threshold": s.step_threshold,
                      "std_estimator": "unbiased" if s.unbiased_std else "population"},
        "write_all": args.write_all,
    }


def parse_filter_args(argv: list[str]) -> tuple[FilterArgs, Config]:
    """`--checkpoint DIR --input PATH --output DIR [--write_all] [--chunk_rows N] [--model_version N]
    [--config FILE] [a.b=c ...]`: the filter's own flags, then the shared Config (selection.*, pipeline.*, ...)."""
    p = job_parser("jobs/filter.py", "Score a trajectory set once with a fixed checkpoint; keep the uncertain rows.",
                   epilog="Any a.b=c argument overrides the shared config, e.g. selection.delta_pred=0.9 "
                          "pipeline.score_actors=4.")
    p.add_argument("--checkpoint", default="", help="EnsemblePRM checkpoint dir (or a loop checkpoint holding model/); "
                   "default: fresh heads on model.backbone")
    p.add_argument("--input", default="", help="Parquet/JSONL file or folder of shards (local or URI); default: synthetic pool")
    p.add_argument("--output", default="", help="output folder (local or URI); default: <run.output_dir>/<run.name>/filter")
    p.add_argument("--write_all", action="store_true", help="also write the discarded rows' scores")
    p.add_argument("--chunk_rows", type=int, default=FilterArgs.chunk_rows, help="rows per chunk (unit of scoring)")
    p.add_argument("--model_version", type=int, default=None, help="model_version to record (default: the checkpoint's)")
    known, cfg = parse_job_args(p, argv)
    return FilterArgs(checkpoint=known.checkpoint, input=known.input, output=known.output, write_all=known.write_all,
                      chunk_rows=known.chunk_rows, model_version=known.model_version), cfg
