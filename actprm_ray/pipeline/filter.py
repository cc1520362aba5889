"""One-shot filtering of a large trajectory set with a fixed checkpoint (METHOD §8, stage 2), resumable per shard.

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
import re
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from actprm_ray.config import Config, run_directory
from actprm_ray.data.rows import NO_ORACLE
from actprm_ray.data.shards import Chunk, filesystem, list_shards, plan_chunks, read_chunk
from actprm_ray.ledger import run_ledger_uri, shards_folder
from actprm_ray.pipeline.plan import Plan, StageSpec
from actprm_ray.pipeline.run import init_ray_from, job_parser, parse_job_args
from actprm_ray.pipeline.stages import CanonicalizeStage, ScoreStage, SelectStage, check_columns

FORMAT_VERSION = 1
CHUNK_BLOCK_BYTES = 256 * 2**20  # Ray Data block size for the filter: a whole chunk (a few MB) in one block

# The retained / discarded rows: the scored-row contract of ARCHITECTURE §4 plus the thresholds that decided them.
OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("question", pa.string()),
    ("steps", pa.list_(pa.string())),  # canonical steps the model read (normalised, sanitised, visible ones)
    ("step_mean", pa.list_(pa.float32())),  # µ per visible step (fp32 from the heads, stored exactly)
    ("step_std", pa.list_(pa.float32())),  # σ per visible step
    ("model_version", pa.int64()),
    ("delta_pred", pa.float64()),
    ("delta_std", pa.float64()),
    ("step_threshold", pa.float64()),
    ("std_estimator", pa.string()),  # population | unbiased
    ("selected", pa.bool_()),
    ("first_error_step", pa.int64()),  # the pool's (simulation), cut to the visible steps like `steps`; else null
])
INVALID_SCHEMA = pa.schema([("id", pa.string()), ("invalid_reason", pa.string())])
WORK_SCHEMA = pa.schema(list(OUTPUT_SCHEMA) + [("valid", pa.bool_()), ("invalid_reason", pa.string()),
                                               ("shard", pa.int64()), ("chunk", pa.int64())])


@dataclass
class FilterArgs:
    """The filter's own command-line arguments (everything else is the shared Config)."""

    checkpoint: str = ""  # EnsemblePRM checkpoint (a loop checkpoint dir or its model/); "" = fresh heads on model.backbone
    input: str = ""  # Parquet/JSONL file or folder of shards, local or pyarrow URI; "" = the synthetic pool
    output: str = ""  # output folder (local or URI); "" = <run.output_dir>/<run.name>/filter
    write_all: bool = False  # also write the discarded (trusted) rows with their scores
    chunk_rows: int = 1024  # rows per chunk: the unit of scoring and of in-flight data
    model_version: int | None = None  # recorded on every row; None = the checkpoint's trainer_state.json, else 0


# -- pipeline stages ------------------------------------------------------------------------------------------------
class CarryCanonicalizeStage(CanonicalizeStage):
    """CanonicalizeStage that passes `carry` columns through unchanged (where the batch has them) and adds
    `num_steps_given` (steps as given, before truncation; 0 if not a list).

    (CanonicalizeStage keeps only its own columns; the filter needs the chunk key, stage-2 training the labels.)
    """

    adds = (*CanonicalizeStage.adds, "num_steps_given")

    def __init__(self, tokenizer_dir: str, *, carry: tuple[str, ...] = (), **kwargs):
        super().__init__(tokenizer_dir, **kwargs)
        self.keeps = tuple(carry)

    def process(self, batch: dict) -> dict:
        out = super().process(batch)
        out["num_steps_given"] = np.asarray([len(s) if isinstance(s, (list, np.ndarray)) else 0
                                             for s in batch["steps"]], dtype=np.int64)
        # Token ids as int32 arrays: Ray pickles an object column of Python int lists element by element, which
        # costs the next stage (the scorer) more CPU than the forward pass of a small model (B1).
        for col in ("input_ids", "readout_positions"):
            for i, v in enumerate(out[col]):
                out[col][i] = np.asarray(v, dtype=np.int32)
        return out


class FilterScoreStage(ScoreStage):
    """ScoreStage with a fixed checkpoint that scores each chunk on its own (see the module docstring: exact
    reruns) and stamps the checkpoint's model_version on every row. Scored, the token ids go: nothing after
    needs them."""

    needs = (*ScoreStage.needs, "shard", "chunk", "chunk_rows")
    drops = ("input_ids", "readout_positions")

    def __init__(self, checkpoint_dir: str, *, batch_size: int, dtype: str, model_version: int, unbiased_std: bool,
                 torch_threads: int | None = None, pack_tokens: int = 0, attn_implementation: str | None = None):
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        super().__init__(checkpoint_dir, batch_size=batch_size, dtype=dtype, pack_tokens=pack_tokens,
                         attn_implementation=attn_implementation)
        self.model.config.unbiased_std = unbiased_std  # the σ estimator is a selection setting (config), not a weight
        self.model_version = model_version

    def process(self, batch: dict) -> dict:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, key in enumerate(zip(batch["shard"].tolist(), batch["chunk"].tolist())):
            groups[key].append(i)
        for (shard, chunk), idx in groups.items():
            if len(idx) != int(batch["chunk_rows"][idx[0]]):
                # Scoring part of a chunk would change the padded batches, and so the last bits of µ, on a rerun.
                raise RuntimeError(f"chunk {chunk} of shard {shard} reached the scorer split ({len(idx)} of "
                                   f"{int(batch['chunk_rows'][idx[0]])} rows): lower --chunk_rows")
        n = len(batch["id"])
        means, stds = np.empty(n, dtype=object), np.empty(n, dtype=object)
        for idx in groups.values():
            part = super().process({k: v[np.asarray(idx)] for k, v in batch.items()})
            for i, mean, std in zip(idx, part["step_mean"], part["step_std"]):
                means[i], stds[i] = mean, std
        return {"step_mean": means, "step_std": stds,
                "model_version": np.full(n, self.model_version, dtype=np.int64)}


# What finish_chunk reads besides SelectStage's needs: the filter's output columns (WORK_SCHEMA).
FINISH_NEEDS = ("question", "steps", "model_version", "oracle_first_error_step", "invalid_reason", "shard", "chunk")


def finish_chunk(batch: dict, *, mode: str, delta_pred: float, delta_std: float, step_threshold: float,
                 random_rate: float, seed: int, std_estimator: str) -> pa.Table:
    """Apply the selection rule (SelectStage) and keep the output columns, as an Arrow table (WORK_SCHEMA)."""
    check_columns(batch, FINISH_NEEDS, "finish_chunk")
    sel = SelectStage(mode=mode, delta_pred=delta_pred, delta_std=delta_std, step_threshold=step_threshold,
                      random_rate=random_rate, seed=seed)(batch)
    n = len(sel["id"])
    return pa.Table.from_pydict({
        "id": [str(x) for x in sel["id"]],
        "question": [str(q) for q in sel["question"]],
        "steps": [[str(s) for s in st] for st in sel["steps"]],
        "step_mean": [[float(x) for x in m] for m in sel["step_mean"]],
        "step_std": [[float(x) for x in s] for s in sel["step_std"]],
        "model_version": sel["model_version"].astype(np.int64),
        "delta_pred": np.full(n, delta_pred), "delta_std": np.full(n, delta_std),
        "step_threshold": np.full(n, step_threshold), "std_estimator": [std_estimator] * n,
        "selected": sel["selected"].astype(bool),
        # The validated value, cut to the visible steps (an invalid row's raw value may be anything).
        "first_error_step": [int(k) if ok and k != NO_ORACLE else None
                             for k, ok in zip(sel["oracle_first_error_step"], sel["valid"])],
        "valid": sel["valid"].astype(bool), "invalid_reason": [str(r) for r in sel["invalid_reason"]],
        "shard": sel["shard"].astype(np.int64), "chunk": sel["chunk"].astype(np.int64),
    }, schema=WORK_SCHEMA)


class ChunkStage(StageSpec):
    """A StageSpec that always hands its callable whole blocks (= whole chunks).

    Ray's map_batches refuses batch_size=None together with GPUs (it wants users to bound the batch); here the
    scorer bounds its own forward batches (pipeline.score_batch_size rows) and needs whole chunks for exact
    reruns, so GPU stages go through map_batches_internal, the same call without that one check.
    """

    def apply(self, ds):
        if not self.num_gpus:
            return super().apply(ds)
        import ray.data

        kwargs = dict(batch_size=None, batch_format="numpy", zero_copy_batch=False, num_cpus=self.num_cpus,
                      num_gpus=self.num_gpus, fn_constructor_kwargs=self.constructor_kwargs, **self.remote_args)
        if self.actors:
            kwargs["compute"] = ray.data.ActorPoolStrategy(min_size=self.actors[0], max_size=self.actors[1])
        return ds.map_batches_internal(self.fn, **kwargs)


# -- checkpoint helpers ------------------------------------------------------------------------------------------
def resolve_model_dir(path: str | Path) -> Path:
    """An EnsemblePRM directory: `path` itself, or `path/model` (a Ray Train checkpoint written by the loop)."""
    p = Path(path)
    for cand in (p, p / "model"):
        cfg = cand / "config.json"
        if cfg.is_file() and "actprm" in json.loads(cfg.read_text()):
            return cand.resolve()
    raise FileNotFoundError(f"{path} is neither an EnsemblePRM checkpoint nor a loop checkpoint holding model/")


def checkpoint_version(model_dir: Path) -> int:
    """model_version of a loop checkpoint (its trainer_state.json beside model/); 0 for any other checkpoint."""
    for cand in (model_dir / "trainer_state.json", model_dir.parent / "trainer_state.json"):
        if cand.is_file():
            return int(json.loads(cand.read_text()).get("version", 0))
    return 0


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


def reason_kind(reason: str) -> str:
    """Group invalid reasons by kind: numbers become '#' ("step 3 is empty" and "step 5 is empty" count together)."""
    return re.sub(r"\d+", "#", reason)[:160]


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


def build_filter_plan(cfg: Config, model_dir: Path, version: int, *, source: str, sink: str,
                      torch_threads: int | None = None) -> Plan:
    """read -> canonicalize -> score -> select, every stage at fractional CPUs and on whole chunks."""
    p, s = cfg.pipeline, cfg.selection
    prm = json.loads((model_dir / "config.json").read_text())["actprm"]
    restart = dict(max_restarts=p.max_restarts, max_task_retries=p.max_task_retries)
    estimator = "unbiased" if s.unbiased_std else "population"
    return Plan(source=source, sink=sink, stages=[
        StageSpec("read", read_chunk, num_cpus=p.map_num_cpus),
        # sep and system prompt come from the checkpoint: the format its heads were trained on (no skew).
        StageSpec("canonicalize", CarryCanonicalizeStage,
                  dict(tokenizer_dir=str(model_dir), sep=prm["sep"], system_prompt=prm["system_prompt"],
                       max_length=cfg.model.max_length, carry=("shard", "chunk", "chunk_rows")),
                  num_cpus=p.map_num_cpus, actors=(1, max(1, p.score_actors)), remote_args=restart),
        ChunkStage("score", FilterScoreStage,
                   dict(checkpoint_dir=str(model_dir), batch_size=p.score_batch_size, dtype=cfg.model.dtype,
                        model_version=version, unbiased_std=s.unbiased_std, torch_threads=torch_threads,
                        pack_tokens=p.score_pack_tokens, attn_implementation=cfg.model.attn_implementation),
                   num_cpus=p.score_num_cpus, num_gpus=p.score_num_gpus, actors=(1, p.score_actors),
                   remote_args=restart),
        StageSpec("select", finish_chunk,
                  fn_kwargs=dict(mode=s.mode, delta_pred=s.delta_pred, delta_std=s.delta_std,
                                 step_threshold=s.step_threshold, random_rate=s.random_rate, seed=s.seed,
                                 std_estimator=estimator),
                  num_cpus=p.map_num_cpus),
    ])


def _defaults(cfg: Config, args: FilterArgs) -> FilterArgs:
    """The embedded default: synthetic pool and fresh heads on model.backbone, under <run.output_dir>/<run.name>."""
    run_dir = run_directory(cfg)
    output = args.output or str(run_dir / "filter")
    checkpoint, data = args.checkpoint, args.input
    if not checkpoint or not data:
        run_dir.mkdir(parents=True, exist_ok=True)
    if not checkpoint:
        from actprm_ray.pipeline.active import prepare_initial_model

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
