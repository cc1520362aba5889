"""jobs/filter.py (actprm_ray/drivers/filter.py, with the stages of actprm_ray/pipeline/filter.py): chunk planning and
reading (pure), the filter against an independent recomputation of the selection rule (Ray), and kill -9 + rerun
== an uninterrupted run (Ray, subprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from actprm_ray.config import load_config
from actprm_ray.data.step_format import DEFAULT_SEP, DEFAULT_SYSTEM_PROMPT
from actprm_ray.data.synthetic import generate_pool, write_pool
from actprm_ray.data.shards import list_shards, plan_chunks, read_chunk
from actprm_ray.drivers.filter import FilterArgs, parse_filter_args, run_filter
from actprm_ray.pipeline.filter import CarryCanonicalizeStage, reason_kind, resolve_model_dir
from actprm_ray.pipeline.ray_env import RAY_ENV_DEFAULTS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tiny_backbone_dir, tmp_path_factory) -> Path:
    from actprm_ray.model.ensemble_prm import EnsemblePRM, PRMConfig

    model = EnsemblePRM.from_backbone(tiny_backbone_dir, PRMConfig(n_heads=8, init_seed=0, sep=DEFAULT_SEP,
                                                                   system_prompt=DEFAULT_SYSTEM_PROMPT))
    return model.save_pretrained(tmp_path_factory.mktemp("filter_ckpt") / "ckpt")


BAD_JSONL_LINES = [
    '{"id": "bad-json", "question": "q", "steps": ["a"',  # truncated: not JSON
    '{"id": "bad-question", "question": 5, "steps": ["a", "b"]}',
    '{"question": "no id here", "steps": ["a"]}',
    '["not", "an", "object"]',
]


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory) -> Path:
    """Two shards: Parquet (40 good rows + 2 bad) and JSONL (30 good + a SEP-in-step row + 4 bad + a blank line)."""
    d = tmp_path_factory.mktemp("pool")
    rows = generate_pool(40, seed=3)
    rows.insert(5, {"id": "empty-steps", "question": "q", "steps": [], "first_error_step": None})
    rows.insert(20, {"id": "blank-step", "question": "q", "steps": ["ok", "   \n\n  "], "first_error_step": None})
    write_pool(rows, d / "a.parquet", batch_rows=16)  # 3 row groups, so chunks cut inside and across row groups
    lines = [json.dumps(r) for r in generate_pool(30, seed=4)]
    lines.insert(3, json.dumps({"id": "sep-inside", "question": "q", "steps": [f"x {DEFAULT_SEP} y", "z"]}))
    for i, bad in enumerate(BAD_JSONL_LINES):
        lines.insert(7 + 5 * i, bad)
    lines.insert(12, "")
    (d / "b.jsonl").write_text("\n".join(lines) + "\n")
    (d / "_ignored.parquet").write_bytes(b"not parquet")  # hidden/underscore files are not shards
    return d


# -- pure: no Ray --------------------------------------------------------------------------------------------------
def test_list_shards_sorted_and_skips_hidden(pool_dir):
    assert [Path(p).name for p in list_shards(str(pool_dir))] == ["a.parquet", "b.jsonl"]
    assert list_shards(str(pool_dir / "b.jsonl")) == [str(pool_dir / "b.jsonl")]
    with pytest.raises(FileNotFoundError):
        list_shards(str(pool_dir / "nope"))


def test_shards_from_a_uri_are_read_back_through_it(pool_dir):
    uri = "file://" + str(pool_dir)
    shards = list_shards(uri)
    assert shards == [uri + "/a.parquet", uri + "/b.jsonl"]
    rows = _read_all(plan_chunks(0, shards[0], chunk_rows=100) + plan_chunks(1, shards[1], chunk_rows=100))
    assert len(rows["id"]) == 42 + 35


def test_plan_chunks_cover_every_row_once(pool_dir):
    parquet = plan_chunks(0, str(pool_dir / "a.parquet"), chunk_rows=10)
    # 42 rows in row groups of 16, 16, 10 -> chunks of 10, 6 | 10, 6 | 10.
    assert [(c.row_group, c.offset, c.rows) for c in parquet] == [(0, 0, 10), (0, 10, 6), (1, 0, 10), (1, 10, 6),
                                                                   (2, 0, 10)]
    jsonl = plan_chunks(1, str(pool_dir / "b.jsonl"), chunk_rows=10)
    assert [c.rows for c in jsonl] == [10, 10, 10, 5]  # 35 non-blank lines; the blank one belongs to no row
    assert [c.chunk for c in jsonl] == [0, 1, 2, 3]


def _read_all(chunks) -> dict:
    cols: dict = {}
    for c in chunks:
        batch = {k: np.asarray([v]) for k, v in c.__dict__.items()}
        for k, v in read_chunk(batch).items():
            cols.setdefault(k, []).extend(v.tolist())
    return cols


def test_read_chunk_turns_bad_lines_into_reasons(pool_dir):
    cols = _read_all(plan_chunks(1, str(pool_dir / "b.jsonl"), chunk_rows=10))
    assert len(cols["id"]) == 35
    errors = {i: e for i, e in zip(cols["id"], cols["read_error"]) if e}
    assert errors["b.jsonl#7"].startswith("bad JSON on line 8")  # line 8 of the file, 1-based
    assert errors["b.jsonl#18"] == "missing id"  # the locator replaces the missing id
    assert errors["b.jsonl#23"] == "row is a JSON array, not an object"
    # A wrong type is judged in the reader (one Arrow type per column, see data/shards.py), with canonicalize's reason.
    assert errors["bad-question"] == "question must be a string, got int"
    assert len(errors) == 4
    parquet = _read_all(plan_chunks(0, str(pool_dir / "a.parquet"), chunk_rows=7))
    assert parquet["id"][:6] == ["syn-3-0", "syn-3-1", "syn-3-2", "syn-3-3", "syn-3-4", "empty-steps"]
    assert len(set(parquet["id"])) == 42 and not any(parquet["read_error"])


def test_carry_canonicalize_marks_read_errors_and_keeps_columns(checkpoint):
    stage = CarryCanonicalizeStage(str(checkpoint), sep=DEFAULT_SEP, system_prompt=DEFAULT_SYSTEM_PROMPT,
                                   max_length=None, carry=("chunk",))
    batch = {"id": np.array(["a", "b"]), "question": np.array(["q", "q"], dtype=object),
             "steps": np.empty(2, dtype=object),
             "read_error": np.array(["", "bad JSON on line 2: x"]), "chunk": np.array([4, 4])}
    batch["steps"][0], batch["steps"][1] = ["x"], ["y", "z"]
    out = stage(batch)
    assert out["valid"].tolist() == [True, False]
    assert out["invalid_reason"][1] == "bad JSON on line 2: x"
    assert out["chunk"].tolist() == [4, 4]


def test_reason_kind_groups_numbers():
    assert reason_kind("step 3 is empty after normalisation") == reason_kind("step 12 is empty after normalisation")


def test_parse_filter_args_splits_flags_from_config():
    args, cfg = parse_filter_args(["--checkpoint", "c", "--input", "i", "--output", "o", "--write_all",
                                   "selection.delta_pred=0.9", "pipeline.score_actors=2"])
    assert (args.checkpoint, args.input, args.output, args.write_all) == ("c", "i", "o", True)
    assert cfg.selection.delta_pred == 0.9 and cfg.pipeline.score_actors == 2
    with pytest.raises(SystemExit):
        parse_filter_args(["--no_such_flag"])


def test_resolve_model_dir_accepts_loop_checkpoint_layout(checkpoint, tmp_path):
    assert resolve_model_dir(checkpoint) == checkpoint.resolve()
    loop_ckpt = tmp_path / "checkpoint_000"
    loop_ckpt.mkdir()
    (loop_ckpt / "model").symlink_to(checkpoint)
    assert resolve_model_dir(loop_ckpt).name in ("model", checkpoint.name)
    with pytest.raises(FileNotFoundError):
        resolve_model_dir(tmp_path)


# -- Ray ---------------------------------------------------------------------------------------------------------------
def _independent_scores(checkpoint, pool_dir, max_length):
    """Score the good rows in-process (no Ray, no filter code): score_trajectories on the rows as written."""
    from actprm_ray.model.ensemble_prm import EnsemblePRM
    from actprm_ray.model.scoring import score_trajectories

    rows = [r for r in pq.read_table(pool_dir / "a.parquet").to_pylist() if r["id"] not in ("empty-steps", "blank-step")]
    for line in (pool_dir / "b.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "id" in r and isinstance(r["question"], str):
            rows.append(r)
    model = EnsemblePRM.from_pretrained(checkpoint).eval()
    scores = score_trajectories(model, model.tokenizer, rows, sep=DEFAULT_SEP, system_prompt=DEFAULT_SYSTEM_PROMPT,
                                batch_size=4, max_length=max_length)
    return {r["id"]: s for r, s in zip(rows, scores)}


def _split_threshold(values: list[float], quantile: float) -> float:
    """A threshold between two neighbouring values near `quantile`, far (> 1e-5) from both: a last-bit difference
    between the filter's µ/σ and ours can never flip a row."""
    v = sorted(set(values))
    start = int(quantile * (len(v) - 1))
    for i in list(range(start, len(v) - 1)) + list(range(start - 1, -1, -1)):
        if v[i + 1] - v[i] > 2e-5:
            return (v[i] + v[i + 1]) / 2
    raise AssertionError("no gap between scores to put a threshold in")


@pytest.mark.ray
@pytest.mark.extended  # CI budget; tests/test_bad_inputs.py runs the filter job in CI
def test_filter_retains_exactly_the_rows_the_rule_selects(ray_local, checkpoint, pool_dir, tmp_path):
    from actprm_ray.select import considered_length, is_uncertain

    scores = _independent_scores(checkpoint, pool_dir, max_length=2048)
    assert len(scores) == 40 + 30 + 1  # the good rows of both shards + the (sanitised) SEP-in-step row
    # Thresholds that split the set: some rows fail the aleatoric test, others only the epistemic one.
    closeness, spread = [], []
    for s in scores.values():
        c = considered_length(s["step_mean"])
        closeness.append(min(max(m, 1 - m) for m in s["step_mean"][:c]))
        spread.append(max(s["step_std"][:c]))
    delta_pred, delta_std = _split_threshold(closeness, 0.3), _split_threshold(spread, 0.7)
    expected = {i for i, s in scores.items()
                if is_uncertain(s["step_mean"], s["step_std"], delta_pred=delta_pred, delta_std=delta_std)}
    assert 0 < len(expected) < len(scores)

    cfg = load_config(overrides=[f"selection.delta_pred={delta_pred}", f"selection.delta_std={delta_std}"])
    out = tmp_path / "out"
    args = FilterArgs(checkpoint=str(checkpoint), input=str(pool_dir), output=str(out), write_all=True, chunk_rows=8,
                      model_version=7)
    summary = run_filter(cfg, args)

    retained = pq.read_table(out / "retained").to_pylist()
    discarded = pq.read_table(out / "discarded").to_pylist()
    assert {r["id"] for r in retained} == expected
    assert {r["id"] for r in discarded} == set(scores) - expected
    for r in retained + discarded:
        ref = scores[r["id"]]
        assert len(r["step_mean"]) == len(ref["step_mean"]) == len(r["steps"])
        np.testing.assert_allclose(r["step_mean"], ref["step_mean"], atol=1e-5)
        np.testing.assert_allclose(r["step_std"], ref["step_std"], atol=1e-5)
        assert r["selected"] == (r["id"] in expected)
        assert (r["model_version"], r["delta_pred"], r["delta_std"], r["std_estimator"]) == (
            7, delta_pred, delta_std, "population")
    # One output file per chunk of 8 rows: the Parquet shard's row groups of 16, 16, 10 rows make 2 + 2 + 2 chunks,
    # the JSONL shard's 35 rows 5. The pool's first_error_step passed through.
    chunk_files = [f"part-00000-{k:06d}.parquet" for k in range(6)] + [f"part-00001-{k:06d}.parquet" for k in range(5)]
    for kind in ("retained", "discarded", "invalid"):
        assert sorted(p.name for p in (out / kind).iterdir()) == chunk_files, kind
    assert summary["pipeline_timing"]["driver_bytes"] < 500 * len(chunk_files)  # counts only, never the rows
    syn = [r for r in retained + discarded if r["id"].startswith("syn-")]
    assert all(r["first_error_step"] is not None for r in syn)

    invalid = {r["id"]: r["invalid_reason"] for r in pq.read_table(out / "invalid").to_pylist()}
    assert set(invalid) == {"empty-steps", "blank-step", "b.jsonl#7", "bad-question", "b.jsonl#18", "b.jsonl#23"}
    assert invalid["empty-steps"] == "steps is empty"
    assert "question must be a string" in invalid["bad-question"]
    n_read = 42 + 35
    assert summary["read"] == n_read and summary["invalid"] == 6 and summary["scored"] == len(scores)
    assert summary["retained"] == len(expected) and summary["discarded"] == len(scores) - len(expected)
    assert summary["retained_fraction"] == pytest.approx(len(expected) / len(scores))
    assert sum(summary["invalid_reasons"].values()) == 6
    assert json.loads((out / "filter_summary.json").read_text())["retained"] == len(expected)

    # Rerun into the same folder: every shard is done, nothing is scored again, same counts.
    again = run_filter(cfg, args)
    assert again["shards_skipped"] == 2 and again["rows_scored_this_run"] == 0
    assert {k: again[k] for k in ("read", "retained", "invalid")} == {k: summary[k] for k in ("read", "retained", "invalid")}
    # ... but not with other thresholds: mixing two rules in one output would be silent corruption.
    other = load_config(overrides=[f"selection.delta_pred={delta_pred}", "selection.delta_std=0.5"])
    with pytest.raises(ValueError, match="other settings"):
        run_filter(other, args)


# -- kill -9 and rerun -------------------------------------------------------------------------------------------------
def _filter_cmd(checkpoint, pool, out) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "filter.py"), "--checkpoint", str(checkpoint), "--input", str(pool),
            "--output", str(out), "--write_all", "--chunk_rows", "16", "selection.delta_pred=0.5", "selection.delta_std=0.0068",
            "pipeline.status_every_s=1"]


def _kill_tree(proc: subprocess.Popen, children: list) -> None:
    """SIGKILL the driver (the crash under test), then reap Ray daemons it leaves behind, by pid."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 20
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.time()))
        except Exception:  # noqa: BLE001 -- still running (or already gone): make sure it is gone
            try:
                child.kill()
            except Exception:  # noqa: BLE001
                pass


@pytest.mark.ray
@pytest.mark.extended  # three filter runs, ~3.5 min on 2 cores
def test_kill_and_rerun_equals_uninterrupted_run(ray_local, checkpoint, tmp_path):
    import psutil

    pool = tmp_path / "pool"
    for k in range(6):
        write_pool(generate_pool(48, seed=10 + k), pool / f"shard-{k}.parquet")
    ref = tmp_path / "ref"
    cfg = load_config(overrides=["selection.delta_pred=0.5", "selection.delta_std=0.0068"])
    reference = run_filter(cfg, FilterArgs(checkpoint=str(checkpoint), input=str(pool), output=str(ref),
                                           write_all=True, chunk_rows=16))
    assert 0 < reference["retained"] < reference["read"] == 6 * 48

    out = tmp_path / "killed"
    env = {**os.environ, **RAY_ENV_DEFAULTS, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(_filter_cmd(checkpoint, pool, out), env=env, stdout=log, stderr=subprocess.STDOUT)
    done_at_kill = 0
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            done_at_kill = len(list((out / "ledger" / "shards").glob("*.parquet")))
            if done_at_kill >= 2:
                break
            time.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        assert proc.poll() is None, f"the run ended before it could be killed:\n{(tmp_path / 'killed.log').read_text()[-3000:]}"
    finally:
        if proc.poll() is None:
            _kill_tree(proc, children)
        log.close()
    assert 2 <= done_at_kill < 6
    assert not (out / "filter_summary.json").exists()

    rerun = subprocess.run(_filter_cmd(checkpoint, pool, out), env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    summary = json.loads((out / "filter_summary.json").read_text())
    assert summary["shards_skipped"] >= done_at_kill
    assert summary["rows_scored_this_run"] <= (6 - done_at_kill) * 48
    for k in ("read", "scored", "retained", "discarded", "invalid", "invalid_reasons"):
        assert summary[k] == reference[k], k
    for sub in ("retained", "discarded", "invalid"):
        names = sorted(p.name for p in (ref / sub).iterdir())
        assert names == sorted(p.name for p in (out / sub).iterdir()) and len(names) == 6 * 3  # 48 rows / 16
        for name in names:
            # Bit-for-bit: same rows, same order, same µ/σ.
            assert pq.read_table(out / sub / name).equals(pq.read_table(ref / sub / name)), (sub, name)
    assert not any((out / "_work").glob("*/*")) if (out / "_work").exists() else True


@pytest.mark.ray
def test_chunk_stage_keeps_whole_chunks_on_gpu_stages(ray_local):
    """map_batches refuses batch_size=None with GPUs; ChunkStage builds the same op without that check (lazily:
    nothing runs, so no GPU is needed here)."""
    import ray.data

    from actprm_ray.pipeline.filter import ChunkStage
    from actprm_ray.pipeline.plan import StageSpec

    ds = ray.data.from_items([{"x": 1}])
    with pytest.raises(ValueError, match="batch_size"):
        StageSpec("score", lambda b: b, num_gpus=1).apply(ds)
    built = ChunkStage("score", FilterScoreStageStub, {"k": 1}, num_gpus=1, actors=(1, 2)).apply(ds)
    assert "FilterScoreStageStub" in str(built._logical_plan.dag)


class FilterScoreStageStub:
    def __init__(self, k: int):
        self.k = k

    def __call__(self, batch):
        return batch
