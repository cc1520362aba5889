"""jobs/label.py's pipeline on a real local Ray instance (oracle labeler; the vLLM judge has its own tests)."""

from __future__ import annotations

import json

import pyarrow.dataset as pads
import pytest

from actprm_ray.config import load_config
from actprm_ray.data.synthetic import generate_pool, write_pool

pytestmark = [pytest.mark.ray]


def test_label_job_training_rows_and_budget(ray_local, tmp_path):
    from actprm_ray.drivers.label_job import LabelArgs, run_label

    rows = generate_pool(30, seed=5)
    write_pool(rows, tmp_path / "in.jsonl")
    cfg = load_config(None, ["budget.max_labels=20", "pipeline.label_batch_size=8"])
    summary = run_label(cfg, LabelArgs(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out")))
    assert summary["status"] == {"ok": 20, "failed": 0, "transient": 0, "skipped": 0, "over_budget": 10, "invalid_input": 0}
    out = pads.dataset(str(tmp_path / "out" / "labelled"), format="parquet").to_table().to_pylist()
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows)  # every row comes out exactly once
    truth = {r["id"]: r["first_error_step"] for r in rows}
    for r in out:
        if r["label_status"] == "ok":
            k = truth[r["id"]]
            assert r["first_error_step"] == k
            assert len(r["steps"]) == len(r["hard_labels"])  # steps after the first error are dropped
            assert r["hard_labels"] == ([1] * len(r["steps"]) if k == -1 else [1] * k + [0])
    assert json.loads((tmp_path / "out" / "label_summary.json").read_text())["rows"] == 30
