"""Evaluation through the loop's own Ray Data stages (pipeline.stages.CanonicalizeStage -> ScoreStage).

On a cluster this scores with up to `actors` ScoreStage replicas (each with `num_gpus`), so a GPU cluster
evaluates in parallel with exactly the code that scores in the loop. The Ray plumbing stays in `pipeline`
(StageSpec/Plan); this module only composes it. EnsemblePRM checkpoints only (ScoreStage loads EnsemblePRM).

`score_rows` hands this scorer every row at once in length-sorted order (`whole_dataset = True`); Ray Data cuts
contiguous batches of `batch_size` from that order, so the padding reported for the sorted order is what the
actors see, up to block boundaries.
"""

from __future__ import annotations

import json
from pathlib import Path

from actprm_ray.data.step_format import DEFAULT_SEP, DEFAULT_SYSTEM_PROMPT, encode_trajectory


class RayDataScorer:
    whole_dataset = True

    def __init__(self, checkpoint_dir: str | Path, *, batch_size: int = 16, actors: int = 1, num_gpus: float = 0.0,
                 num_cpus: float = 0.25, dtype: str = "float32", system_prompt: str | None = None):
        from transformers import AutoTokenizer

        self.checkpoint_dir = str(checkpoint_dir)
        meta = json.loads((Path(checkpoint_dir) / "config.json").read_text())
        if "actprm" not in meta:
            raise ValueError(f"{checkpoint_dir}: the Ray scorer needs an EnsemblePRM checkpoint (no 'actprm' in config.json)")
        cfg = meta["actprm"]
        self.sep = cfg.get("sep") or DEFAULT_SEP
        self.system_prompt = system_prompt if system_prompt is not None else (cfg.get("system_prompt") or DEFAULT_SYSTEM_PROMPT)
        self.batch_size, self.actors, self.num_gpus, self.num_cpus, self.dtype = batch_size, actors, num_gpus, num_cpus, dtype
        self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint_dir)  # driver side, for lengths only

    def lengths(self, rows: list[dict]) -> list[int]:
        """Token counts for bucketing and the padding report (the actors tokenise again, in parallel)."""
        return [len(encode_trajectory(self.tokenizer, r["question"], r["steps"], sep=self.sep,
                                      system_prompt=self.system_prompt).input_ids) for r in rows]

    def plan(self):
        from actprm_ray.pipeline.plan import Plan, StageSpec
        from actprm_ray.pipeline.stages import CanonicalizeStage, ScoreStage

        return Plan(source="evaluation rows (length-sorted)", sink="driver", stages=[
            StageSpec("canonicalize", CanonicalizeStage,
                      dict(tokenizer_dir=self.checkpoint_dir, sep=self.sep, system_prompt=self.system_prompt,
                           max_length=None),  # no truncation at evaluation (METHOD §2)
                      batch_size=self.batch_size, num_cpus=self.num_cpus, actors=(1, 1)),
            StageSpec("score", ScoreStage, dict(checkpoint_dir=self.checkpoint_dir, batch_size=self.batch_size, dtype=self.dtype),
                      batch_size=self.batch_size, num_cpus=self.num_cpus, num_gpus=self.num_gpus, actors=(1, self.actors)),
        ])

    def __call__(self, rows: list[dict]) -> list[list[float]]:
        import ray.data

        from actprm_ray.pipeline.ray_env import init_ray

        ids = [str(r["id"]) for r in rows]
        if len(set(ids)) != len(ids):
            raise ValueError("RayDataScorer needs unique row ids (results are matched back by id)")
        init_ray()
        ds = ray.data.from_items([{"id": i, "question": r["question"], "steps": list(r["steps"])} for i, r in zip(ids, rows)])
        out = self.plan().apply(ds).select_columns(["id", "valid", "invalid_reason", "step_mean"]).take_all()
        bad = [(r["id"], r["invalid_reason"]) for r in out if not r["valid"]]
        if bad:
            raise RuntimeError(f"Ray scorer rejected rows that passed the canonical check: {bad[:3]}")
        by_id = {r["id"]: [float(x) for x in r["step_mean"]] for r in out}
        return [by_id[i] for i in ids]

    def describe(self) -> dict:
        return {"sep": self.sep, "system_prompt": self.system_prompt, "kind": "ensemble", "scorer": "ray",
                "actors": self.actors, "num_gpus_per_actor": self.num_gpus}
