"""The real vLLM judge (CPU build) as the label stage of the streaming loop, plus the label cache across reruns."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from actprm_ray.config import load_config

pytest.importorskip("vllm")
pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
GSM8K_TRAIN = REPO.parent / "shared" / "data" / "problems" / "gsm8k" / "train.jsonl"


@pytest.fixture(scope="module")
def rollout_pool(tmp_path_factory) -> Path:
    """The paper's data path starts here: jobs/generate.py writes policy rollouts in the pool-row schema."""
    if not GSM8K_TRAIN.exists():
        pytest.skip(f"no shared data at {GSM8K_TRAIN}")
    out = tmp_path_factory.mktemp("rollouts") / "rollouts"  # a pool folder of shards
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, str(REPO / "jobs" / "generate.py"), f"generate.problems_path={GSM8K_TRAIN}",
           f"generate.out_dir={out}", "generate.limit=8", "generate.samples_per_problem=2", "generate.max_tokens=48"]
    proc = subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _cfg(tmp_path, name, backbone_dir, *overrides):
    base = [f"run.name={name}", f"run.output_dir={tmp_path}", "model.n_heads=4", "model.max_length=512",
            "data.synthetic_rows=24", "selection.mode=all", "train.lr=1e-3", "train.warmup_steps=2",
            "train.micro_batch_size=4", "pipeline.score_batch_size=8", "pipeline.label_batch_size=8",
            "pipeline.no_progress_timeout_s=300",  # the engine takes ~20-100 s to start on a busy 2-core box
            "labeler.kind=vllm", "labeler.judge.judge_id=tiny-judge", f"labeler.judge.model={backbone_dir}",
            "labeler.judge.dtype=float32", "labeler.judge.enforce_eager=true", "labeler.judge.max_model_len=2048",
            "labeler.judge.max_tokens=600", "labeler.judge.guided_max_analysis_chars=24",
            f"labeler.judge.cache_path={tmp_path / 'cache'}",  # shared by both runs: outside each run dir
            "run.allow_external_paths=true"]
    return load_config(None, base + list(overrides))


@pytest.mark.parametrize("source", ["synthetic", pytest.param("rollouts", marks=pytest.mark.extended)])
def test_vllm_judge_in_the_loop_guided_then_cached(ray_local, tiny_backbone_dir, source, request, tmp_path):
    """active_train with the vLLM judge -> rerun from the cache. `rollouts`: the paper's data path, generate ->
    active_train on its rollouts (no oracle there: only the judge can label them); it adds a generate run."""
    from actprm_ray.drivers.active import run_active

    if source == "rollouts":
        rollout_pool = request.getfixturevalue("rollout_pool")
        n, pool = pq.read_table(rollout_pool).num_rows, f"data.pool={rollout_pool}"
    else:
        n, pool = 12, "data.synthetic_rows=12"
    first = run_active(_cfg(tmp_path, "judge1", tiny_backbone_dir, "labeler.judge.guided=true", pool))
    rows = pq.read_table(f"{first['run_dir']}/outcomes.parquet").to_pylist()
    assert first["identity_holds"] and first["rows_read"] == n > 0
    # Guided decoding: every critique parses, so every selected row is trained on a judge label.
    others = [r for r in rows if r["outcome"] != "trained"]
    assert first["outcomes"]["trained"] == n - first["outcomes"]["invalid_input"] > 0, others
    assert all(r["label_source"].startswith("vllm:") for r in rows if r["outcome"] == "trained")
    assert first["budget"]["judge_generated_tokens"] > 0

    if source != "rollouts":
        return  # CI budget: the zero-cost rerun is tested on the engine (test_vllm_judge) and server (test_http_judge)
    # Same pool, same judge, same cache, new run: zero judge tokens paid.
    second = run_active(_cfg(tmp_path, "judge2", tiny_backbone_dir, "labeler.judge.guided=true", pool))
    assert second["outcomes"]["trained"] == first["outcomes"]["trained"]
    assert second["budget"]["judge_generated_tokens"] == 0
    assert second["budget"]["cache_hits"] == second["outcomes"]["trained"]


@pytest.mark.extended  # CI budget; unguided failures are tested on the engine (test_vllm_judge.py) and server (test_http_judge.py)
def test_vllm_judge_unguided_failures_are_recorded(ray_local, tiny_backbone_dir, tmp_path):
    from actprm_ray.drivers.active import run_active

    summary = run_active(_cfg(tmp_path, "judge3", tiny_backbone_dir, "labeler.judge.guided=false",
                              "labeler.judge.max_tokens=32", "data.synthetic_rows=8"))
    rows = pq.read_table(f"{summary['run_dir']}/outcomes.parquet").to_pylist()
    assert summary["identity_holds"]
    failed = [r for r in rows if r["outcome"] == "label_failed"]
    # A random model does not write the tag format: rows fail with a reason, and the run completes.
    assert failed and all(r["reason"] for r in failed)
