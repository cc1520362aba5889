"""The real vLLM judge (CPU build) as the label stage of the streaming loop, plus the label cache across reruns."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from actprm_ray.config import load_config

pytest.importorskip("vllm")
pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]


def _cfg(tmp_path, name, backbone_dir, *overrides):
    base = [f"run.name={name}", f"run.output_dir={tmp_path}", "model.n_heads=4", "model.max_length=512",
            "data.synthetic_rows=24", "selection.mode=all", "train.lr=1e-3", "train.warmup_steps=2",
            "train.micro_batch_size=4", "pipeline.score_batch_size=8", "pipeline.label_batch_size=8",
            "pipeline.no_progress_timeout_s=300",  # the engine takes ~20-100 s to start on a busy 2-core box
            "labeler.kind=vllm", "labeler.judge.judge_id=tiny-judge", f"labeler.judge.model={backbone_dir}",
            "labeler.judge.dtype=float32", "labeler.judge.enforce_eager=true", "labeler.judge.max_model_len=2048",
            "labeler.judge.max_tokens=600", "labeler.judge.guided_max_analysis_chars=24",
            f"labeler.judge.cache_path={tmp_path / 'cache.sqlite'}",  # shared by both runs: outside each run dir
            "run.allow_external_paths=true"]
    return load_config(None, base + list(overrides))


def test_vllm_judge_in_the_loop_guided_then_cached(ray_local, tiny_backbone_dir, tmp_path):
    from actprm_ray.pipeline.active import run_active

    first = run_active(_cfg(tmp_path, "judge1", tiny_backbone_dir, "labeler.judge.guided=true"))
    rows = pq.read_table(f"{first['run_dir']}/outcomes.parquet").to_pylist()
    assert first["identity_holds"]
    # Guided decoding: every critique parses, so every selected row is trained on a judge label.
    others = [r for r in rows if r["outcome"] != "trained"]
    assert first["outcomes"]["trained"] == 24 - first["outcomes"]["invalid_input"] > 0, others
    assert all(r["label_source"].startswith("vllm:") for r in rows if r["outcome"] == "trained")
    assert first["budget"]["judge_generated_tokens"] > 0

    # Same pool, same judge, same cache, new run: zero judge tokens paid.
    second = run_active(_cfg(tmp_path, "judge2", tiny_backbone_dir, "labeler.judge.guided=true"))
    assert second["outcomes"]["trained"] == first["outcomes"]["trained"]
    assert second["budget"]["judge_generated_tokens"] == 0
    assert second["budget"]["cache_hits"] == second["outcomes"]["trained"]


def test_vllm_judge_unguided_failures_are_recorded(ray_local, tiny_backbone_dir, tmp_path):
    from actprm_ray.pipeline.active import run_active

    summary = run_active(_cfg(tmp_path, "judge3", tiny_backbone_dir, "labeler.judge.guided=false",
                              "labeler.judge.max_tokens=32", "data.synthetic_rows=8"))
    rows = pq.read_table(f"{summary['run_dir']}/outcomes.parquet").to_pylist()
    assert summary["identity_holds"]
    failed = [r for r in rows if r["outcome"] == "label_failed"]
    # A random model does not write the tag format: rows fail with a reason, and the run completes.
    assert failed and all(r["reason"] for r in failed)
