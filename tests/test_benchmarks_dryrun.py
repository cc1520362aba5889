"""The benchmark scripts stay runnable: each one's --dry_run (tiny shapes, CPU) end to end, checked for content."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
       "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(script: str, *args: str, timeout: int = 600) -> None:
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--dry_run", *args], env=ENV,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_gpu_scoring_dry_run(tmp_path):
    out = tmp_path / "b3.json"
    _run("gpu_scoring.py", "--out", str(out))
    rep = json.loads(out.read_text())
    assert rep["ray_or_omegaconf_imported"] == []  # the GPU box has torch + transformers only
    assert [v["variant"] for v in rep["variants"]] == ["plain_eager", "plain_sdpa", "ours"]
    # Hand count for the dry-run shape (hidden 64, 2 layers, 2 heads of 32, 1 KV head, MLP 128, vocab 512) and
    # 4 heads of 64 -> 128 -> 128 -> 1. Per layer: q 64*64+64, k and v 64*32+32 each, o 64*64, MLP 3*64*128,
    # two norms of 64 = 37,120; two layers + final norm = 74,304. Heads: 4*(64*128+128 + 128*128+128 + 128+1).
    assert rep["params_backbone"] == 74_304 + 512 * 64
    assert rep["params_flops"] == 74_304 + 4 * (64 * 128 + 128 + 128 * 128 + 128 + 128 + 1)
    for v in rep["variants"]:
        assert v["mu_max_abs_diff_vs_first"] < 1e-5  # fp32: the three paths compute the same µ
        assert v["tokens_per_s"] == pytest.approx(rep["tokens"] / v["wall_s"])
    by = {v["variant"]: v for v in rep["variants"]}
    assert by["ours"]["padding_fraction"] < by["plain_eager"]["padding_fraction"]  # length-sorted batches


@pytest.mark.ray
@pytest.mark.slow
def test_pipeline_overhead_dry_run(tmp_path):
    out = tmp_path / "b1.json"
    _run("pipeline_overhead.py", "--out", str(out))
    rep = json.loads(out.read_text())
    assert rep["rows"] == 32 and all(p["rows"] == 32 for p in rep["plain_runs"])
    assert rep["same_retained_rows"]  # both arms apply the same rule to the same scores
    assert rep["ratio_ray_over_plain_throughput"] > 0


@pytest.mark.ray
@pytest.mark.slow
def test_filter_scale_dry_run(tmp_path):
    out = tmp_path / "b2.json"
    _run("filter_scale.py", "--work", str(tmp_path / "work"), "--out", str(out), "--sample_s", "0.5", timeout=900)
    rep = json.loads(out.read_text())
    assert [r["rows"] for r in rep["runs"]] == [200, 400]
    for r in rep["runs"]:
        assert r["peak_pss_gib"] > 0.1 and r["peak_rss_gib"] >= r["peak_pss_gib"]  # Ray alone holds > 100 MiB
        assert 0 <= r["retained"] <= r["rows"]
    assert rep["peak_pss_ratio"] > 0
