"""The filter's stages and plan (METHOD §8, stage 2): read a chunk -> Canonicalize -> Score with a fixed
checkpoint -> Select -> Write, on whole chunks. The job around them (chunk planning, per-shard completion records,
resume) is actprm_ray/drivers/filter.py, whose docstring draws the whole flow.

The workers write: the write stage puts each chunk's rows into the output folder's _work/ and sends the driver
only the chunk's counts (a few hundred bytes), so the rows never pass through the driver, however many there are.

Why chunks: a row's µ depends, in its last bits, on which rows share its forward batch (padded, or packed into one
line with pipeline.score_pack_tokens: the kernels' shapes change either way). A chunk is a fixed slice of one shard,
every pipeline call sees whole chunks (batch_size=None) and the scorer batches only inside a chunk, so each row is
scored with the same neighbours in every run, whatever happened before a kill. Evaluation on Ray
(eval/ray_scorer.py) runs the same Canonicalize and Score stages.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actprm_ray.config import Config
from actprm_ray.data.rows import NO_ORACLE
from actprm_ray.data.shards import filesystem, read_chunk
from actprm_ray.pipeline.plan import Plan, StageSpec
from actprm_ray.pipeline.stages import CanonicalizeStage, ScoreStage, SelectStage, check_columns

DEFAULT_CHUNK_ROWS = 1024  # rows per chunk: the unit of scoring and of in-flight data
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
                                               ("shard", pa.int64()), ("chunk", pa.int64()),
                                               ("chunk_rows", pa.int64())])
OUTPUT_KINDS = ("retained", "discarded", "invalid")  # the output folders; discarded only with write_all
COUNTS = ("read", "scored", "retained", "discarded", "invalid")
# What the write stage sends back to the driver: one row per chunk.
CHUNK_COUNTS_SCHEMA = pa.schema([("shard", pa.int64()), ("chunk", pa.int64()),
                                 *[(k, pa.int64()) for k in COUNTS],
                                 ("invalid_reasons", pa.string())])  # JSON object: reason kind -> count


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
FINISH_NEEDS = ("question", "steps", "model_version", "oracle_first_error_step", "invalid_reason", "shard", "chunk",
                "chunk_rows")


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
        "chunk_rows": sel["chunk_rows"].astype(np.int64),
    }, schema=WORK_SCHEMA)


# -- the write stage: chunk files from the workers ------------------------------------------------------------------
def shard_key(shard: int) -> str:
    return f"part-{shard:05d}"


def work_file(shard: int, kind: str, chunk: int) -> str:
    """A finished chunk's rows of one kind, relative to the output folder, until its shard is complete."""
    return f"_work/{shard_key(shard)}/{kind}-{chunk:06d}.parquet"


def output_file(shard: int, kind: str, chunk: int) -> str:
    """Where that file is moved once every chunk of the shard is written: sorted names = input row order."""
    return f"{kind}/{shard_key(shard)}-{chunk:06d}.parquet"


def write_chunk(table: pa.Table, *, output: str, write_all: bool) -> pa.Table:
    """Write each whole chunk in `table` (WORK_SCHEMA) as retained / invalid (/ discarded) Parquet files under
    `output`/_work; return one CHUNK_COUNTS_SCHEMA row per chunk. Each file lands under a hidden temporary name
    and is then moved, so a killed worker leaves no half file; a retried task rewrites the same names."""
    fs, root = filesystem(output)
    keys = np.stack([table.column("shard").to_numpy(), table.column("chunk").to_numpy()], axis=1)
    counts = []
    for shard, chunk in sorted({(int(a), int(b)) for a, b in keys}):
        t = table.filter(pa.array((keys[:, 0] == shard) & (keys[:, 1] == chunk)))
        expected = t.column("chunk_rows")[0].as_py()
        if t.num_rows != expected:
            # Two pieces of one chunk would write the same file names, the second over the first.
            raise RuntimeError(f"chunk {chunk} of shard {shard} reached the write stage split ({t.num_rows} of "
                               f"{expected} rows): lower --chunk_rows")
        valid = np.asarray(t.column("valid").to_numpy(zero_copy_only=False), dtype=bool)
        selected = np.asarray(t.column("selected").to_numpy(zero_copy_only=False), dtype=bool) & valid
        parts = {"retained": t.filter(pa.array(selected)).select(OUTPUT_SCHEMA.names),
                 "discarded": t.filter(pa.array(valid & ~selected)).select(OUTPUT_SCHEMA.names),
                 "invalid": t.filter(pa.array(~valid)).select(INVALID_SCHEMA.names)}
        for kind, part in parts.items():
            if kind != "discarded" or write_all:
                _write_atomic(fs, f"{root.rstrip('/')}/{work_file(shard, kind, chunk)}", part)
        reasons = Counter(reason_kind(r) for r in parts["invalid"].column("invalid_reason").to_pylist())
        counts.append({"shard": shard, "chunk": chunk, "read": t.num_rows, "scored": int(valid.sum()),
                       **{k: parts[k].num_rows for k in OUTPUT_KINDS}, "invalid_reasons": json.dumps(dict(reasons))})
    return pa.Table.from_pylist(counts, schema=CHUNK_COUNTS_SCHEMA)


def _write_atomic(fs, path: str, table: pa.Table) -> None:
    folder, name = path.rsplit("/", 1)
    fs.create_dir(folder, recursive=True)
    tmp = f"{folder}/.tmp-{name}"
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, path)


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


def reason_kind(reason: str) -> str:
    """Group invalid reasons by kind: numbers become '#' ("step 3 is empty" and "step 5 is empty" count together)."""
    return re.sub(r"\d+", "#", reason)[:160]


def build_filter_plan(cfg: Config, model_dir: Path, version: int, *, source: str, sink: str,
                      output: str | None = None, write_all: bool = False, torch_threads: int | None = None) -> Plan:
    """read -> canonicalize -> score -> select (-> write into `output`, when given), every stage at fractional
    CPUs and on whole chunks. Without `output` the plan ends with the selected rows (evaluation on Ray)."""
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
        *([StageSpec("write", write_chunk, fn_kwargs=dict(output=output, write_all=write_all),
                     num_cpus=p.map_num_cpus, batch_format="pyarrow")] if output else []),
    ])
