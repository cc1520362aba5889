"""The streaming plan: a printable list of named stages, built lazily onto a Ray Dataset (ray.data.llm style).

    read pool -> Canonicalize -> Score -> Select -> Label -> (TorchTrainer)

Resources: every stage takes a fractional CPU so that, on a 2-core machine, trainer (1 CPU) + the minimum
actor of every stage + one task slot fit (STACK_NOTES §5); with the defaults Ray Data would deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from actprm_ray.config import Config
from actprm_ray.data.shards import map_batches
from actprm_ray.label.base import OracleLabeler
from actprm_ray.pipeline.stages import CanonicalizeStage, LabelStage, ScoreStage, SelectStage, arrow_lists


@dataclass
class StageSpec:
    name: str
    fn: Callable | type
    constructor_kwargs: dict = field(default_factory=dict)
    fn_kwargs: dict = field(default_factory=dict)
    batch_size: int | None = None
    num_cpus: float = 0.1
    num_gpus: float = 0.0
    actors: tuple[int, int] | None = None  # (min, max) actor pool for callable classes; None = tasks
    remote_args: dict = field(default_factory=dict)
    batch_format: str = "numpy"  # what the callable receives: "numpy" (dict of arrays) or "pyarrow" (a Table)

    def describe(self) -> str:
        where = f"actors {self.actors[0]}..{self.actors[1]}" if self.actors else "tasks"
        gpu = f", {self.num_gpus} GPU" if self.num_gpus else ""
        return f"{self.name:<13} {getattr(self.fn, '__name__', self.fn)!s:<18} {where}, {self.num_cpus} CPU{gpu}, batch {self.batch_size}"

    def apply(self, ds):
        import ray.data

        kwargs: dict[str, Any] = dict(batch_size=self.batch_size, batch_format=self.batch_format, num_cpus=self.num_cpus,
                                      zero_copy_batch=False, **self.remote_args)
        if self.num_gpus:
            kwargs["num_gpus"] = self.num_gpus
        if self.actors:
            kwargs["compute"] = ray.data.ActorPoolStrategy(min_size=self.actors[0], max_size=self.actors[1])
            kwargs["fn_constructor_kwargs"] = self.constructor_kwargs
        if self.fn_kwargs:
            kwargs["fn_kwargs"] = self.fn_kwargs
        return map_batches(ds, self.fn, **kwargs)


@dataclass
class Plan:
    source: str
    stages: list[StageSpec]
    sink: str

    def describe(self) -> str:
        lines = [f"source  {self.source}"] + [f"  -> {s.describe()}" for s in self.stages] + [f"  -> sink {self.sink}"]
        return "\n".join(lines)

    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def apply(self, ds):
        for s in self.stages:
            ds = s.apply(ds)
        return ds


def drop_accounted(batch: dict, ids: frozenset) -> dict:
    """Resume: rows that already have an outcome are not scored or labelled again."""
    keep = np.array([str(i) not in ids for i in batch["id"]], dtype=bool)
    return arrow_lists({k: v[keep] for k, v in batch.items()})


def select_batch(batch: dict, **kwargs) -> dict:
    return SelectStage(**kwargs)(batch)


def labeler_class(kind: str):
    if kind == "oracle":
        return OracleLabeler
    if kind == "vllm":
        from actprm_ray.label.vllm_judge import VLLMJudgeLabeler

        return VLLMJudgeLabeler
    if kind == "http":
        from actprm_ray.label.http_judge import HttpJudgeLabeler

        return HttpJudgeLabeler
    raise ValueError(f"unknown labeler kind {kind!r}")


def actor_fault_args(cfg: Config) -> dict:
    """Actor stages: restart a dead actor (bounded) and re-run its in-flight batch there (default unbounded, as Ray
    Data: every attempt that finds the actor unreachable counts, and a node loss makes several within a second)."""
    return dict(max_restarts=cfg.pipeline.max_restarts, max_task_retries=cfg.pipeline.max_task_retries)


def task_fault_args(cfg: Config) -> dict:
    """Task stages: re-run a task whose worker died, bounded (Ray Data: unbounded)."""
    return dict(max_retries=cfg.pipeline.map_max_retries)


def build_active_plan(cfg: Config, *, init_dir: str, coordinator_name: str, accounted: frozenset = frozenset(),
                      source: str = "pool") -> Plan:
    p, sel = cfg.pipeline, cfg.selection
    restart, retry = actor_fault_args(cfg), task_fault_args(cfg)
    stages = []
    if accounted:
        stages.append(StageSpec("drop_done", drop_accounted, fn_kwargs={"ids": accounted}, num_cpus=p.map_num_cpus,
                                remote_args=retry))
    stages.append(StageSpec(
        "canonicalize", CanonicalizeStage, dict(tokenizer_dir=init_dir, sep=cfg.model.sep,
                                                system_prompt=cfg.model.system_prompt, max_length=cfg.model.max_length),
        batch_size=p.score_batch_size, num_cpus=p.map_num_cpus, actors=(1, 1), remote_args=restart))
    if not sel.inline:
        import ray

        coordinator = ray.get_actor(coordinator_name, namespace="actprm") if coordinator_name else None
        stages.append(StageSpec(
            "score", ScoreStage, dict(checkpoint_dir=init_dir, batch_size=p.score_batch_size, coordinator=coordinator,
                                      dtype=cfg.model.dtype, pack_tokens=p.score_pack_tokens,
                                      attn_implementation=cfg.model.attn_implementation),
            batch_size=p.score_batch_size, num_cpus=p.score_num_cpus, num_gpus=p.score_num_gpus,
            actors=(1, p.score_actors), remote_args=restart))
        from actprm_ray.pipeline.coordinator import CoordinatorController

        controller = CoordinatorController(coordinator) if sel.target_rate is not None and coordinator else None
        stages.append(StageSpec(
            "select", select_batch, fn_kwargs=dict(mode=sel.mode, delta_pred=sel.delta_pred, delta_std=sel.delta_std,
                                                   step_threshold=sel.step_threshold, random_rate=sel.random_rate,
                                                   seed=sel.seed, audit_rate=sel.audit_rate, controller=controller),
            batch_size=p.score_batch_size, num_cpus=p.map_num_cpus, remote_args=retry))
        stages.append(StageSpec(
            "label", LabelStage, dict(labeler_cls=labeler_class(cfg.labeler.kind), labeler_config=cfg.labeler.judge,
                                      coordinator=coordinator),
            batch_size=p.label_batch_size, num_cpus=p.label_num_cpus, num_gpus=p.label_num_gpus,
            actors=(1, p.label_actors), remote_args=restart))
    return Plan(source=source, stages=stages, sink=f"TorchTrainer x{cfg.train.num_workers} (trains labelled rows, "
                                                   "records every row's outcome)")
