"""Policy rollouts: splitting, problem loading, pool rows, and one real generate job on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from actprm_ray.label.rollouts import POOL_COLUMNS, load_problems, rollout_row, split_completion, write_pool_parquet

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ACTPRM_SHARED_DATA", REPO / ".." / "shared" / "data"))
GSM8K_TRAIN = SHARED_DATA / "problems" / "gsm8k" / "train.jsonl"


def test_split_on_blank_lines_and_drop_empty_pieces():
    text = "\n\nFirst, 48/2 = 24.\nThat is May.\n\n\n\nThen 48+24 = 72.\n\n   \n\nThe answer is 72.\n\n"
    assert split_completion(text) == ["First, 48/2 = 24.\nThat is May.", "Then 48+24 = 72.", "The answer is 72."]
    assert split_completion("one step only") == ["one step only"]
    assert split_completion("") == [] and split_completion("\n\n \n\n") == []


def test_load_problems_names_ids_by_file_and_line(tmp_path):
    folder = tmp_path / "mathset"
    folder.mkdir()
    f = folder / "train.jsonl"
    f.write_text('{"question": "What is 1+1?", "answer": "2"}\n\n{"problem": "What is 2+2?"}\n'
                 '{"id": "p7", "question": "What is 3+3?"}\n')
    probs = load_problems(f)
    assert probs == [{"problem_id": "mathset-train-0", "question": "What is 1+1?"},
                     {"problem_id": "mathset-train-2", "question": "What is 2+2?"},
                     {"problem_id": "p7", "question": "What is 3+3?"}]
    assert len(load_problems(f, limit=2)) == 2


def test_load_problems_rejects_a_record_without_text(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"answer": "2"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_problems(f)


def test_rollout_row_and_parquet_schema(tmp_path):
    problem = {"problem_id": "gsm8k-train-3", "question": "Q?"}
    row = rollout_row(problem, 1, "a\n\nb", "stop", 12, "pol")
    assert row == {"id": "gsm8k-train-3-s1", "question": "Q?", "steps": ["a", "b"], "source": "rollout:pol",
                   "problem_id": "gsm8k-train-3", "sample_index": 1, "finish_reason": "stop", "policy_tokens": 12}
    assert rollout_row(problem, 0, "\n\n", "length", 3, "pol") is None
    write_pool_parquet([row], tmp_path / "x" / "pool.parquet")
    table = pq.read_table(tmp_path / "x" / "pool.parquet")
    assert tuple(table.column_names) == POOL_COLUMNS and table.to_pylist() == [row]


@pytest.mark.vllm
@pytest.mark.extended  # a vLLM engine start, ~4 min on 2 cores: CI budget
def test_generate_job_on_gsm8k_with_the_tiny_policy(tmp_path):
    if not GSM8K_TRAIN.exists():
        pytest.skip(f"no shared data at {GSM8K_TRAIN}")
    out = tmp_path / "rollouts.parquet"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, str(REPO / "jobs" / "generate.py"), f"generate.problems_path={GSM8K_TRAIN}",
           f"generate.out_path={out}", "generate.limit=3", "generate.samples_per_problem=2", "generate.max_tokens=64"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pq.read_table(out).to_pylist()
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    assert summary["problems"] == 3 and summary["completions"] == 6
    assert summary["rows"] == len(rows) == 6 - summary["empty_completions"]
    assert len({r["id"] for r in rows}) == len(rows)
    first_questions = [json.loads(line)["question"] for line in GSM8K_TRAIN.open().readlines()[:3]]
    for r in rows:
        assert r["question"] == first_questions[int(r["problem_id"].rsplit("-", 1)[1])]
        assert r["steps"] and all(s and s == s.strip() and "\n\n" not in s for s in r["steps"])
        assert 0 < r["policy_tokens"] <= 64 and r["source"] == "rollout:tiny-random"
