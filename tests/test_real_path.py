"""The paper's data path end to end on a real small model, on CPU (issue 16 item 3): SmolLM2-135M-Instruct as the
rollout policy, the vLLM judge and the PRM backbone, each job run the way a user runs it (benchmarks/real_path.py:
jobs/*.py with conf/real_small.yaml, each in its own process).

    generate -> filter -> label (vLLM judge, structured outputs) -> train (stage 2) -> evaluate (ProcessBench slice)
    extended: generate -> active_train (stage 1, vLLM judge, generated pool) -> filter -> label -> train -> evaluate

The labels of a 135M judge are poor; the assertions are structural: every row has an outcome, every critique
parses (or fails with a reason) and stays inside the grammar, the checkpoint loads and moved, metrics are finite.
CI size: 2 problems x 2 samples, 2 vLLM engine starts and one trainer (~4-5 min on 2 idle cores).
Either run writes its per-stage timings to $ACTPRM_REAL_PATH_RESULTS when set
(benchmarks/results/real_path_cpu.json is one such run).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

pytest.importorskip("vllm")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import real_path  # noqa: E402

from actprm_ray.data.rows import check_hard_labels  # noqa: E402
from actprm_ray.data.shards import list_shards  # noqa: E402
from actprm_ray.label.prompt import guided_regex  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]
GSM8K_TRAIN = real_path.SHARED_DATA / "problems" / "gsm8k" / "train.jsonl"
PROCESSBENCH = real_path.SHARED_DATA / "processbench"
STATUSES = {"ok", "failed"}  # no budget, no HTTP: a judged row either parses or fails with a reason


@pytest.fixture(scope="module", autouse=True)
def _needs_data_and_model():
    if not GSM8K_TRAIN.exists() or not PROCESSBENCH.exists():
        pytest.skip(f"no shared data at {real_path.SHARED_DATA}")
    from actprm_ray.model.import_gguf import ModelImportError, resolve_model

    try:
        resolve_model("smollm2-135m")  # converts once into the models cache (~1 min) if not there yet
    except ModelImportError as e:
        pytest.skip(str(e))


def check_path(report: dict) -> None:
    """Structural checks of every stage's outputs (shared by the CI and the extended run)."""
    s, st = report["settings"], report["stages"]

    # generate (on Ray, ray.data.llm): one completion per (problem, sample), written as the shards of a pool
    # folder (bookkeeping under "_" names, out of the readers' way); every kept row has clean, non-empty steps.
    gen = st["generate"]["summary"]
    shards = list_shards(report["paths"]["rollouts"])
    assert len(shards) == gen["shards"] == gen["shards_written"] >= 1 and gen["shards_skipped"] == 0
    assert all(Path(x).name.startswith("shard-") for x in shards)
    rollouts = pq.read_table(report["paths"]["rollouts"]).to_pylist()
    assert gen["problems"] == s["problems"] and gen["completions"] == s["problems"] * s["samples"]
    assert gen["rows"] == len(rollouts) == \
        gen["completions"] - gen["empty_completions"] - gen["unreadable_completions"] > 0
    assert len({r["id"] for r in rollouts}) == len(rollouts)
    for r in rollouts:
        assert r["steps"] and all(x and x == x.strip() and "\n\n" not in x for x in r["steps"]), r["id"]
        assert 0 < r["policy_tokens"] <= s["policy_tokens"] and r["source"] == "rollout:smollm2-135m-instruct"
        assert r["finish_reason"] in ("stop", "length")

    # active_train (extended): every rollout ends in exactly one outcome; selected rows got judge labels.
    if "active_train" in st:
        a = st["active_train"]["summary"]
        assert a["identity_holds"] and a["rows_read"] == len(rollouts)
        assert sum(a["outcomes"].values()) == len(rollouts)
        assert a["outcomes"]["trained"] > 0 and a["budget"]["judge_generated_tokens"] > 0
        outcomes = pq.read_table(Path(report["paths"]["stage1"]) / "outcomes.parquet").to_pylist()
        assert all(r["label_source"].startswith("vllm:") for r in outcomes if r["outcome"] == "trained")
        assert all(r["reason"] for r in outcomes if r["outcome"] in ("label_failed", "invalid_input"))

    # filter: every rollout scored once, µ/σ per visible step, finite.
    f = st["filter"]["summary"]
    assert f["read"] == len(rollouts) and f["scored"] + f["invalid"] == f["read"] and f["scored"] > 0
    assert f["retained"] + f["discarded"] == f["scored"] and f["retained"] > 0
    retained = pads.dataset(str(Path(report["paths"]["rollouts"]).parent / "filter" / "retained"),
                            format="parquet").to_table().to_pylist()
    assert len(retained) == f["retained"]
    for r in retained:
        assert len(r["step_mean"]) == len(r["step_std"]) == len(r["steps"]) > 0, r["id"]
        assert all(0.0 < m < 1.0 for m in r["step_mean"]) and all(x >= 0.0 for x in r["step_std"]), r["id"]

    # label: every retained row comes out once with a status; ok rows carry a METHOD §1 labelling of their steps.
    lab = st["label"]["summary"]
    assert lab["identity_holds"] and lab["rows"] == f["retained"]
    labelled = pads.dataset(str(Path(report["paths"]["rollouts"]).parent / "labels" / "labelled"),
                            format="parquet").to_table().to_pylist()
    assert {r["label_status"] for r in labelled} <= STATUSES
    ok = [r for r in labelled if r["label_status"] == "ok"]
    assert ok, [r["label_reason"] for r in labelled]
    for r in labelled:
        assert r["judge_tokens"] > 0 and r["judge_prompt_tokens"] > 100, r["id"]
        if r["label_status"] == "ok":
            assert check_hard_labels(r["hard_labels"], len(r["steps"])) == "" and len(r["hard_labels"]) == len(r["steps"])
            assert r["label_source"] == "vllm:smollm2-135m-instruct"
        else:
            assert r["label_reason"], r["id"]
    # Structured outputs held the real model to the grammar: every finished critique is a full match of the
    # row's regex (a critique cut at max_tokens is a failed row, with its reason, checked above).
    cache = pads.dataset(str(Path(report["paths"]["rollouts"]).parent / "labels" / "ledger" / "labels"),
                         format="parquet").to_table().to_pylist()
    assert len(cache) == lab["rows"]
    for c in cache:
        if c["status"] == "ok":
            pattern = guided_regex(int(c["num_steps"]), 160)  # conf/real_small.yaml: guided_max_analysis_chars
            assert re.fullmatch(pattern, c["critique"]), c["critique"]

    # train: the ok rows are trained, the checkpoint loads as a PRM on the real backbone and its heads moved.
    tr = st["train"]["summary"]
    assert sum(tr["outcomes"].values()) == tr["rows_read"] == lab["rows"]
    assert tr["outcomes"]["trained"] == len(ok) and tr["optimizer_steps"] >= 1
    assert math.isfinite(tr["final_loss"])
    _check_checkpoint(report["paths"]["stage2_checkpoint"])

    # evaluate: every ProcessBench row of the slice is scored, one µ per step, metrics finite.
    pb = st["evaluate"]["summary"]["benchmarks"]["processbench"]
    assert set(pb["subsets"]) == {"gsm8k", "math", "olympiadbench", "omnimath"}
    assert all(v["n"] == s["eval_limit"] for v in pb["subsets"].values())
    assert 0.0 <= pb["mean_f1"] <= 1.0 and all(0.0 <= v["f1"] <= 1.0 for v in pb["subsets"].values())
    preds = [json.loads(x) for x in (Path(report["paths"]["eval"]) / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 * s["eval_limit"]
    for p in preds:
        assert p["step_mu"] and all(0.0 < m < 1.0 for m in p["step_mu"]), p["id"]
        assert -1 <= p["pred"] < len(p["step_mu"]), p["id"]


def _check_checkpoint(path: str) -> None:
    import torch
    from safetensors.torch import load_file

    from actprm_ray.model.ensemble_prm import EnsemblePRM

    model = EnsemblePRM.from_pretrained(path)
    assert model.backbone.config.model_type == "llama" and model.backbone.config.hidden_size == 576
    assert model.tokenizer.convert_tokens_to_ids(model.config.sep) == 49152  # SEP added after SmolLM2's 49,152
    init = Path(path).parents[3] / "init" / "heads.safetensors"  # <run>/ray_train/<name>/checkpoint_*/model
    trained, fresh = load_file(Path(path) / "heads.safetensors"), load_file(init)
    assert set(trained) == set(fresh)
    assert any(not torch.equal(trained[k], fresh[k]) for k in trained if "anchor" not in k)


def _record(report: dict) -> None:
    result = real_path.timings(report)
    if os.environ.get("ACTPRM_REAL_PATH_RESULTS"):
        Path(os.environ["ACTPRM_REAL_PATH_RESULTS"]).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["stages"], indent=2))


# Five jobs, each its own process: ~5 min on 2 idle cores, 15-20 min when the box is shared (and a vLLM engine
# start can be repeated after a memory kill), past the suite's 900 s default.
@pytest.mark.timeout(2400)
def test_real_path_ci(tmp_path):
    """generate -> filter -> label -> train -> evaluate on SmolLM2, at CI size."""
    report = real_path.run_path(tmp_path, "ci")
    check_path(report)
    _record(report)


@pytest.mark.extended  # ~15-25 min on 2 cores: three engine starts, two trainers, a longer evaluate
@pytest.mark.timeout(4800)
def test_real_path_extended(tmp_path):
    """Stage 1 with active_train and the vLLM judge on the generated pool, then the CI path from its checkpoint."""
    report = real_path.run_path(tmp_path, "extended")
    check_path(report)
    _record(report)
