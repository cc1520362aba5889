"""The filter job: one-shot filtering of a large trajectory set with a fixed checkpoint (METHOD §8, stage 2), resumable per shard.

    input shards (Parquet / JSONL; a file, a folder, local or any pyarrow URI), sorted by path
      -> chunks: fixed row ranges of one shard (<= chunk_rows rows), planned on the driver
      -> read -> Canonicalize -> Score (actor pool, fixed checkpoint) -> Select -> Write      (Ray Data, streaming)
           the write stage (on the workers) puts each chunk's rows under _work/part-NNNNN/ and sends the driver
           only the chunk's counts
      -> driver, once every chunk of a shard is written: moves the shard's files into place,
           retained/part-NNNNN-CCCCCC.parquet    valid rows the rule selects (what the judge labels next)
           discarded/part-NNNNN-CCCCCC.parquet   valid rows it trusts (only with write_all)
           invalid/part-NNNNN-CCCCCC.parquet     id + reason of rows that could not be scored
           ledger/shards/                        the shard's done-record with its counts, appended last (actprm_ray/ledger.py)
      -> filter_summary.json              counts over all shards (read, scored, retained, invalid, fraction)

One file per chunk and kind (shard NNNNN, chunk CCCCCC): read a folder as one dataset, and its rows come in input
order. The rows never pass through the driver: it handles a few hundred bytes per chunk (B2 measures it).

Why chunks: a row's µ depends, in its last bits, on which rows share its forward batch (padded, or packed into one
line with pipeline.score_pack_tokens: the kernels' shapes change either way). A chunk is a fixed slice of one shard,
every pipeline call sees whole chunks (batch_size=None) and the scorer batches only inside a chunk, so each row is
scored with the same neighbours in every run, whatever happened before a kill. A shard's files are moved into
place before its done-record is written, and a rerun first deletes whatever an unfinished shard left (in _work/ or
already moved), so it skips exactly the finished shards and the result equals an uninterrupted run's. Memory is flat
in the number of rows: Ray Data's object-store budget bounds what is in flight, and the driver keeps counts only.

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

import pyarrow.fs as pafs

from actprm_ray.config import Config, run_directory
from actprm_ray.data.shards import Chunk, filesystem, list_shards, plan_chunks
from actprm_ray.drivers.run import init_ray_from, job_parser, parse_job_args
from actprm_ray.ledger import run_ledger_uri, shards_folder
from actprm_ray.pipeline.filter import (CHUNK_BLOCK_BYTES, COUNTS, DEFAULT_CHUNK_ROWS, OUTPUT_KINDS, build_filter_plan,
                                        checkpoint_version, output_file, resolve_model_dir, shard_key, work_file)

FORMAT_VERSION = 2  # 2: one output file per chunk (part-NNNNN-CCCCCC), written by the workers


@dataclass
class FilterArgs:
    """The filter's own command-line arguments (everything else is the shared Config)."""

    checkpoint: str = ""  # EnsemblePRM checkpoint (a loop checkpoint dir or its model/); "" = fresh heads on model.backbone
    input: str = ""  # Parquet/JSONL file or folder of shards, local or pyarrow URI; "" = the synthetic pool
    output: str = ""  # output folder (local or URI); "" = <run.output_dir>/<run.name>/filter
    write_all: bool = False  # also write the discarded (trusted) rows with their scores
    chunk_rows: int = DEFAULT_CHUNK_ROWS  # rows per chunk: the unit of scoring and of in-flight data
    model_version: int | None = None  # recorded on every row; None = the checkpoint's trainer_state.json, else 0


# -- output folder ------------------------------------------------------------------------------------------------
class _Store:
    """The output folder through a pyarrow file system (local path or URI). The workers write the rows; the
    driver only lists, moves and deletes files and writes the small JSON files."""

    def __init__(self, uri: str):
        self.uri = uri if "://" in uri else str(Path(uri).resolve())  # the workers' working directory is not ours
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
        tmp = self.path(rel) + ".tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(obj, indent=2, sort_keys=True).encode())
        self.fs.move(tmp, self.path(rel))

    def move(self, src: str, dest: str) -> None:
        self.fs.create_dir(self.path(dest.rsplit("/", 1)[0]), recursive=True)
        self.fs.move(self.path(src), self.path(dest))

    def names(self, folder: str) -> list[str]:
        selector = pafs.FileSelector(self.path(folder), allow_not_found=True)
        return [info.base_name for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File]

    def delete(self, rel: str) -> None:
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))


def _clear_unfinished(store: _Store, shards: set[int]) -> None:
    """Delete what unfinished shards left: their _work/ folders and any file already moved into place."""
    for shard in shards:
        store.delete(f"_work/{shard_key(shard)}")
    for kind in OUTPUT_KINDS:
        for name in store.names(kind):
            if name.startswith("part-") and int(name[5:10]) in shards:
                store.delete(f"{kind}/{name}")


def _finalize_shard(store: _Store, shard: int, path: str, chunks: list[dict], write_all: bool) -> dict:
    """Move a written shard's chunk files into place (chunk order), then append its done-record with the counts
    the write stage sent (`chunks`: one row per chunk)."""
    kinds = [k for k in OUTPUT_KINDS if k != "discarded" or write_all]
    for c in sorted(chunks, key=lambda c: c["chunk"]):
        for kind in kinds:
            store.move(work_file(shard, kind, c["chunk"]), output_file(shard, kind, c["chunk"]))
    reasons: Counter = Counter()
    for c in chunks:
        reasons.update(json.loads(c["invalid_reasons"]))
    marker = {"key": shard_key(shard), "shard": path, **{k: sum(c[k] for c in chunks) for k in COUNTS},
              "invalid_reasons": json.dumps(dict(reasons))}
    shards_folder(store.ledger_uri).append([marker], tag="shard")
    store.delete(f"_work/{shard_key(shard)}")
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
    _clear_unfinished(store, set(pending))  # leftovers of a killed run: those shards are redone from scratch
    chunks: list[Chunk] = []
    for i in pending:
        planned = plan_chunks(i, shards[i], args.chunk_rows)
        chunks.extend(planned)
        if not planned:  # an empty shard is finished at once
            _finalize_shard(store, i, shards[i], [], args.write_all)
    total_rows = sum(c.rows for c in chunks)
    print(f"[filter] {len(shards)} shards ({len(done)} already done), {total_rows} rows to score in {len(chunks)} "
          f"chunks -> {args.output}", flush=True)
    timing = {}
    if chunks:
        timing = _run_pipeline(cfg, args, store, shards, chunks, model_dir, version, total_rows, torch_threads)
    store.delete("_work")
    summary = _summarize(store, shards, len(done), total_rows, time.time() - started, args, model_dir, version, cfg)
    summary["pipeline_timing"] = timing
    store.write_json("filter_summary.json", summary)
    return summary


def _run_pipeline(cfg, args, store, shards, chunks, model_dir, version, total_rows, torch_threads) -> dict:
    """Stream the chunks through the plan (the workers write them); finish each shard once all its chunks are
    written. Returns timings: start-up (plan start to the first written chunk: actors, model load), the steady
    rate, measured over the second half of the rows so that start-up and the first chunks' queueing behind it
    cancel out, and the bytes the driver received."""
    import ray.data

    init_ray_from(cfg)
    plan = build_filter_plan(cfg, model_dir, version, torch_threads=torch_threads, output=store.uri,
                             write_all=args.write_all, source=f"{len(chunks)} chunks of <= {args.chunk_rows} rows",
                             sink=f"driver: chunk counts; per-shard done-records under {args.output}")
    print(f"[filter] plan:\n{plan.describe()}", flush=True)
    # One descriptor per block, so each read call emits exactly one chunk downstream; and a chunk must stay one
    # block (pipeline.block_size_kb is tuned for the loop's row-level backpressure and would split it). The
    # dataset's own context carries this, the process-wide one is left alone.
    source = ray.data.from_items([asdict(c) for c in chunks], override_num_blocks=len(chunks))
    if source.context.target_max_block_size is not None:
        source.context.target_max_block_size = max(source.context.target_max_block_size, CHUNK_BLOCK_BYTES)
    ds = plan.apply(source)

    expected = {(c.shard, c.chunk) for c in chunks}
    per_shard = Counter(c.shard for c in chunks)
    written: dict[int, list[dict]] = defaultdict(list)
    rows_done, shards_done, driver_bytes, t0, last = 0, 0, 0, time.time(), time.time()
    arrivals: list[tuple[float, int]] = []  # (time, rows done) after each written chunk
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        driver_bytes += table.nbytes
        for c in table.to_pylist():
            key = (c["shard"], c["chunk"])
            if key not in expected:
                raise RuntimeError(f"chunk {key[1]} of shard {key[0]} was written twice or is not in the plan")
            expected.remove(key)
            written[c["shard"]].append(c)
            rows_done += c["read"]
            arrivals.append((time.time(), rows_done))
            if len(written[c["shard"]]) == per_shard[c["shard"]]:
                _finalize_shard(store, c["shard"], shards[c["shard"]], written.pop(c["shard"]), args.write_all)
                shards_done += 1
        if time.time() - last >= cfg.pipeline.status_every_s:
            last = time.time()
            rate = rows_done / max(last - t0, 1e-9)
            print(f"[filter] {last - t0:7.0f}s rows {rows_done}/{total_rows} ({rate:.1f} rows/s), shards left "
                  f"{len(per_shard) - shards_done}", flush=True)
    if expected:
        raise RuntimeError(f"pipeline ended with unwritten chunks: {sorted(expected)[:5]}")
    end = time.time()
    mid = next((a for a in arrivals if a[1] >= total_rows / 2), None)
    steady = (rows_done - mid[1]) / (arrivals[-1][0] - mid[0]) if mid and arrivals[-1][0] > mid[0] else None
    return {"pipeline_s": end - t0, "startup_s": (arrivals[0][0] if arrivals else end) - t0,
            "steady_rows_per_s": steady, "driver_bytes": driver_bytes}


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
