"""Evaluation on Ray: the filter's own stages, Canonicalize -> Score (pipeline/filter.build_filter_plan).

On a cluster this scores with up to `actors` FilterScoreStage replicas (each with `num_gpus`), so a GPU cluster
evaluates with exactly the code that filters and scores in the loop (model/scoring.score_encoded). The actors
tokenise each row once; the driver does not tokenise at all. EnsemblePRM checkpoints only (the stages load one).

The rows go in as chunks, as the filter's do: fixed slices of the input, one Ray block each, every chunk scored
whole by one actor, in score_encoded's length-sorted batches. A chunk is at most the filter's chunk size and
small enough that every actor gets one. Between the two stages one step of evaluation's own: a row over
max_tokens is made invalid (evaluation never truncates) and every row's token count kept for the padding report.
"""

from __future__ import annotations

import copy
import json
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from actprm_ray.data.step_format import DEFAULT_SYSTEM_PROMPT
from actprm_ray.eval.batching import Scored, token_limit_reason
from actprm_ray.model.scoring import length_batches
from actprm_ray.pipeline.stages import Stage


class TokenLimitStage(Stage):
    """Canonicalised rows -> + num_tokens (for the padding report); a valid row over max_tokens becomes invalid,
    with the reason: evaluation never truncates (METHOD §2)."""

    needs = ("id", "input_ids", "valid", "invalid_reason")
    adds = ("num_tokens", "valid", "invalid_reason")

    def __init__(self, max_tokens: int | None):
        self.max_tokens = max_tokens

    def process(self, batch: dict) -> dict:
        num_tokens = np.asarray([len(ids) for ids in batch["input_ids"]], dtype=np.int64)
        # An object copy of the reasons: a fixed-width string array would cut a longer reason short.
        valid, reasons = np.array(batch["valid"], dtype=bool), np.array(batch["invalid_reason"], dtype=object)
        for i in np.flatnonzero(valid):
            why = token_limit_reason(int(num_tokens[i]), self.max_tokens)
            if why:
                valid[i], reasons[i] = False, why
        return {"num_tokens": num_tokens, "valid": valid, "invalid_reason": reasons}


def limit_tokens(batch: dict, *, max_tokens: int | None) -> dict:
    """TokenLimitStage as a Ray Data task (it holds no state worth an actor)."""
    return TokenLimitStage(max_tokens)(batch)


class RayDataScorer:
    """A batching.Scorer on Ray Data. The pipeline.score_* settings map onto the filter's plan; `batch_size`
    here is only the default of `plan()` (a call's batch_size wins)."""

    def __init__(self, checkpoint_dir: str | Path, *, batch_size: int = 16, actors: int = 1, num_gpus: float = 0.0,
                 num_cpus: float = 0.25, dtype: str = "float32", system_prompt: str | None = None):
        from actprm_ray.config import Config
        from actprm_ray.pipeline.filter import resolve_model_dir

        self.model_dir = resolve_model_dir(checkpoint_dir)  # raises unless it is an EnsemblePRM checkpoint
        self.cfg = Config()
        p = self.cfg.pipeline
        p.score_batch_size, p.score_actors, p.score_num_gpus, p.score_num_cpus = batch_size, actors, num_gpus, num_cpus
        self.cfg.model.dtype = dtype
        prm = _prm_section(self.model_dir)
        self.sep = prm["sep"]
        self.system_prompt = system_prompt if system_prompt is not None else (prm["system_prompt"] or DEFAULT_SYSTEM_PROMPT)

    def plan(self, batch_size: int | None = None, max_tokens: int | None = None):
        """The filter's canonicalize and score stages, with evaluation's token limit between them."""
        from actprm_ray.pipeline.filter import build_filter_plan
        from actprm_ray.pipeline.plan import Plan, StageSpec

        cfg = copy.deepcopy(self.cfg)
        if batch_size is not None:
            cfg.pipeline.score_batch_size = batch_size
        stages = {s.name: s for s in build_filter_plan(cfg, self.model_dir, 0, source="", sink="").stages}
        # No truncation at evaluation (METHOD §2); eval.system_prompt may override the checkpoint's.
        stages["canonicalize"].constructor_kwargs.update(max_length=None, system_prompt=self.system_prompt)
        limit = StageSpec("limit_tokens", limit_tokens, fn_kwargs=dict(max_tokens=max_tokens),
                          num_cpus=cfg.pipeline.map_num_cpus)
        return Plan(source="evaluation rows, in chunks", sink="driver",
                    stages=[stages["canonicalize"], limit, stages["score"]])

    def __call__(self, rows: list[dict], *, batch_size: int, max_tokens: int | None = None,
                 progress: Callable[[int], None] | None = None) -> Scored:
        """Score `rows` on Ray; progress is Ray Data's own (its progress bars), not `progress`."""
        import ray.data

        from actprm_ray.pipeline.filter import CHUNK_BLOCK_BYTES
        from actprm_ray.pipeline.ray_env import init_ray

        if not rows:
            return Scored([], {}, [], [])
        init_ray()
        chunk_rows = _chunk_rows(len(rows), self.cfg.pipeline.score_actors)
        tables = [_chunk_table(rows, start, chunk_rows) for start in range(0, len(rows), chunk_rows)]
        source = ray.data.from_arrow(tables)  # one block per chunk; the stages keep it whole, as in the filter
        if source.context.target_max_block_size is not None:
            source.context.target_max_block_size = max(source.context.target_max_block_size, CHUNK_BLOCK_BYTES)
        out = self.plan(batch_size, max_tokens).apply(source).select_columns(
            ["id", "chunk", "num_tokens", "valid", "invalid_reason", "step_mean"]).take_all()
        return _scored(len(rows), out, batch_size)

    def describe(self) -> dict:
        p = self.cfg.pipeline
        return {"sep": self.sep, "system_prompt": self.system_prompt, "kind": "ensemble", "scorer": "ray",
                "actors": p.score_actors, "num_gpus_per_actor": p.score_num_gpus}


def _prm_section(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())["actprm"]


def _chunk_table(rows: list[dict], start: int, chunk_rows: int):
    """Chunk `start // chunk_rows` as an Arrow table in the filter's row shape; id = position in `rows`."""
    import pyarrow as pa

    part = rows[start : start + chunk_rows]
    return pa.table({"id": [str(start + j) for j in range(len(part))],
                     "question": [r["question"] for r in part],
                     "steps": pa.array([list(r["steps"]) for r in part], pa.list_(pa.string())),
                     "shard": [0] * len(part), "chunk": [start // chunk_rows] * len(part),
                     "chunk_rows": [len(part)] * len(part)})


def _chunk_rows(n: int, actors: int) -> int:
    """Rows per chunk: enough chunks for every actor, none larger than the filter's default chunk."""
    from actprm_ray.pipeline.filter import DEFAULT_CHUNK_ROWS

    return max(1, min(DEFAULT_CHUNK_ROWS, math.ceil(n / max(1, actors))))


def _scored(n: int, out: list[dict], batch_size: int) -> Scored:
    """The pipeline's rows (id = input position) -> Scored; the batches are each chunk's length batches, the ones
    its actor ran (FilterScoreStage scores a chunk's valid rows with score_encoded)."""
    mus: list[list[float] | None] = [None] * n
    reasons, lengths = {}, [0] * n
    by_chunk: dict[int, list[int]] = defaultdict(list)
    for r in out:
        j = int(r["id"])
        lengths[j] = int(r["num_tokens"])
        if r["valid"]:
            mus[j] = [float(x) for x in r["step_mean"]]
            by_chunk[int(r["chunk"])].append(j)
        else:
            reasons[j] = str(r["invalid_reason"])
    batches = []
    for chunk in sorted(by_chunk):
        idx = sorted(by_chunk[chunk])
        batches += [[idx[i] for i in b] for b in length_batches([lengths[j] for j in idx], batch_size)]
    return Scored(mus, reasons, lengths, batches)
