"""What a rollout is (METHOD §8), with no engine: problems in, chat prompts, per-request seeds, pool rows out.

The policy answers each problem under the canonical system prompt (model.system_prompt); the completion is
split on blank lines ("\\n\\n") into steps and empty pieces are dropped. Output rows carry the pool-row columns
(id, question, steps, source) plus provenance (problem_id, sample_index, finish_reason, policy_tokens).
Everything here is a plain function, unit-tested on hand cases (tests/test_rollouts.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

ROLLOUT_COLUMNS = ("id", "question", "steps", "source", "problem_id", "sample_index", "finish_reason",
                   "policy_tokens")


def rollout_schema():
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("question", pa.string()), ("steps", pa.list_(pa.string())), ("source", pa.string()),
        ("problem_id", pa.string()), ("sample_index", pa.int32()), ("finish_reason", pa.string()),
        ("policy_tokens", pa.int32()),
    ])


class ProblemsError(ValueError):
    """The problems file cannot be used: missing, not JSONL of problems, or without a problem."""


def load_problems(path: str | Path, limit: int | None = None) -> list[dict]:
    """[{problem_id, question}] from a JSONL file: the first `limit` problems, blank lines skipped.

    Ids are "<folder>-<file stem>-<line>" (e.g. "gsm8k-train-0") unless the record has its own "id". Raises
    ProblemsError naming the file (and line) for a missing file, a line that is not a JSON object with a
    "question" or "problem" text, a repeated id, or a file without a problem.
    """
    path = Path(path)
    if not path.is_file():
        raise ProblemsError(f"problems file not found: {path} (generate.problems_path: JSONL, one "
                            '{"question": ...} per line)')
    problems, seen = [], {}
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if limit is not None and len(problems) >= limit:
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ProblemsError(f"{path}:{line_no + 1}: not JSON ({e.msg})") from None
            question = rec.get("question", rec.get("problem")) if isinstance(rec, dict) else None
            if not isinstance(question, str) or not question.strip():
                raise ProblemsError(f"{path}:{line_no + 1}: no 'question' or 'problem' text")
            pid = str(rec["id"]) if "id" in rec else f"{path.parent.name}-{path.stem}-{line_no}"
            if pid in seen:  # rollout ids, shard records and seeds are keyed by it
                raise ProblemsError(f"{path}:{line_no + 1}: id {pid!r} repeats line {seen[pid]}")
            seen[pid] = line_no + 1
            problems.append({"problem_id": pid, "question": question})
    if not problems:
        raise ProblemsError(f"{path}: no problems in the file")
    return problems


def chat_prompt_ids(tokenizer, system_prompt: str, question: str) -> list[int]:
    """The token ids the policy sees: its chat template over (system prompt, question), ready for its answer."""
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}],
        tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def split_completion(text: str) -> list[str]:
    """Split a policy completion into steps on "\\n\\n"; pieces that are empty or blank are dropped.

    >>> split_completion("First, 2+3=5.\\n\\n\\n\\nSo the answer is 5.\\n\\n")
    ['First, 2+3=5.', 'So the answer is 5.']
    """
    return [piece.strip() for piece in text.split("\n\n") if piece.strip()]


def rollout_row(problem: dict, sample_index: int, text: str, finish_reason: str, policy_tokens: int,
                policy_id: str) -> dict:
    """One pool row. `steps == []` is an empty completion: the job counts it and never writes it (a pool row
    needs a step)."""
    return {
        "id": f"{problem['problem_id']}-s{sample_index}",
        "question": problem["question"],
        "steps": split_completion(text),
        "source": f"rollout:{policy_id}",
        "problem_id": problem["problem_id"],
        "sample_index": sample_index,
        "finish_reason": finish_reason,
        "policy_tokens": policy_tokens,
    }


def sample_seed(base_seed: int, problem_id: str, sample_index: int) -> int:
    """The seed of one (problem, sample) request: independent of the batch, the shard and the other problems, so
    a shard generated again (a resumed run) samples what it would have the first time."""
    key = f"{base_seed}/{problem_id}/{sample_index}"
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF
