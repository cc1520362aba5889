"""TRL / HF datasets interop (actprm_ray/interop.py) with the real `datasets` and `trl` packages, on real files.

No Ray: pools are read through data/shards.py's pure reader. Needs the `hf` extra (scripts/install.sh installs it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actprm_ray import interop
from actprm_ray.interop import POOL_SCHEMA, read_pool
from actprm_ray.config import shared_data_dir

datasets = pytest.importorskip("datasets", reason="the `hf` extra (datasets, trl) is not installed")

PROCESSBENCH_GSM8K = shared_data_dir() / "processbench" / "gsm8k.jsonl"  # ../shared/data or $ACTPRM_SHARED_DATA
SEP = "<extra_0>"

POOL = [
    {"id": "ok", "question": "What is 2 + 3?", "steps": ["2 + 3 = 5.", "The answer is 5."], "first_error_step": -1},
    {"id": "err1", "question": "What is 4 * 2?", "steps": ["4 * 2 = 8.", "8 + 1 = 10.", "The answer is 10."],
     "first_error_step": 1},
    {"id": "err0", "question": "What is 9 - 9?", "steps": ["9 - 9 = 1.", "So 1."], "first_error_step": 0},
    {"id": "nolabel", "question": "Q?", "steps": ["a."], "first_error_step": None},
    {"id": "empty", "question": "Q?", "steps": [], "first_error_step": -1},
    {"id": "ok", "question": "Q again?", "steps": ["b."], "first_error_step": -1},  # repeated id
]


def _pool_rows(path) -> list[dict]:
    rows = [r for _, r in read_pool(str(path))]
    assert all(not r["read_error"] for r in rows), [r["read_error"] for r in rows]
    return [{k: r[k] for k in ("id", "question", "steps", "first_error_step")} for r in rows]


def _skipped(out: Path) -> dict[str, str]:
    return {s["id"]: s["reason"] for s in map(json.loads, (out / "_skipped.jsonl").read_text().splitlines())}


def test_pool_to_trl_to_pool_round_trip(tmp_path):
    pq.write_table(pa.Table.from_pylist(POOL, schema=POOL_SCHEMA), tmp_path / "pool.parquet")
    good = [r for r in POOL[:3]]

    # drop (METHOD §1): completions end at the first error, so the steps after it do not come back.
    report = interop.export_trl(str(tmp_path / "pool.parquet"), str(tmp_path / "trl"))
    assert report["rows"] == 3 and report["skipped"] == 3
    skipped = _skipped(tmp_path / "trl")
    assert skipped["nolabel"] == "no label: first_error_step is null"
    assert skipped["empty"] == "steps is empty"
    assert any("duplicate id 'ok'" in reason for reason in skipped.values())  # the reader's own reason
    ds = datasets.load_from_disk(str(tmp_path / "trl" / "hf"))
    assert ds.column_names == ["id", "prompt", "completions", "labels"]
    assert ds.features["labels"].feature.dtype == "bool"
    assert ds[1] == {"id": "err1", "prompt": "What is 4 * 2?", "completions": ["4 * 2 = 8.", "8 + 1 = 10."],
                     "labels": [True, False]}
    assert pq.read_table(tmp_path / "trl" / "train.parquet").to_pylist() == ds.to_list()

    back = interop.import_trl(str(tmp_path / "trl" / "hf"), str(tmp_path / "back"))
    assert back["rows"] == 3 and back["skipped"] == 0
    cut = [{**r, "steps": r["steps"][: r["first_error_step"] + 1] if r["first_error_step"] >= 0 else r["steps"]}
           for r in good]
    assert _pool_rows(tmp_path / "back") == cut  # the folder: our reader skips _skipped.jsonl/_report.json

    # false: every step kept, the ones after the first error labelled False -> a lossless round trip.
    interop.export_trl(str(tmp_path / "pool.parquet"), str(tmp_path / "trl_all"), after_error="false")
    assert datasets.load_from_disk(str(tmp_path / "trl_all" / "hf"))[1]["labels"] == [True, False, False]
    interop.import_trl(str(tmp_path / "trl_all" / "train.parquet"), str(tmp_path / "back_all"))
    assert _pool_rows(tmp_path / "back_all" / "pool.parquet") == good


def test_label_job_output_exports_ok_rows_only(tmp_path):
    from actprm_ray.drivers.label_job import TRAINING_ROW_SCHEMA

    base = dict(label_source="http:qwq", label_key="k", label_cache_hit=False, judge_prompt_tokens=10,
                judge_tokens=100, label_attempts=1, label_reason="")
    rows = [dict(id="a", question="Q1?", steps=["s0.", "s1."], hard_labels=[1, 0], first_error_step=1,
                 label_status="ok", **base),
            dict(id="b", question="Q2?", steps=["t0."], hard_labels=[1], first_error_step=-1, label_status="ok",
                 **base),
            dict(id="c", question="Q3?", steps=["u0."], hard_labels=[], first_error_step=-2, label_status="failed",
                 **{**base, "label_reason": "no <conclusion>"})]
    (tmp_path / "job" / "labelled").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=TRAINING_ROW_SCHEMA), tmp_path / "job" / "labelled" / "0.parquet")
    report = interop.export_trl(str(tmp_path / "job"), str(tmp_path / "out"))
    assert report["source_kind"] == "label_job" and report["rows"] == 2
    assert _skipped(tmp_path / "out") == {"c": "label_status failed: no <conclusion>"}
    assert datasets.load_from_disk(str(tmp_path / "out" / "hf"))["labels"] == [[True, False], [True]]


def test_finished_run_exports_its_trained_rows_from_pool_and_label_cache(tmp_path):
    """A run keeps no steps + labels table: the export joins outcomes.parquet, the pool and the label cache."""
    from actprm_ray.config import load_config, save_resolved
    from actprm_ray.label.cache import CacheEntry, LabelCache, label_key
    from actprm_ray.pipeline.outcomes import OUTCOME_SCHEMA, outcome_row

    pool = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist(POOL[:3], schema=POOL_SCHEMA), pool)
    run = tmp_path / "run"
    save_resolved(load_config(None, [f"data.pool={pool}", "labeler.kind=http"]), run)
    key = {r["id"]: label_key(r["question"], r["steps"], "qwq", "v1", {"t": 0.5}) for r in POOL[:3]}
    # The judge disagrees with the pool's first error on "ok": the export must carry the judge's label.
    LabelCache(run / "ledger" / "labels").put_many([
        CacheEntry(key["ok"], "ok", 1, "", "critique", "http:qwq", 2, 10, 100, 1),
        CacheEntry(key["err1"], "ok", -1, "", "critique", "http:qwq", 3, 10, 100, 1)])
    outcomes = [outcome_row("ok", "trained", label_key=key["ok"]),
                outcome_row("err1", "trained", label_key=key["err1"]),
                outcome_row("err0", "trained", label_key=key["err0"]),  # its cache entry is gone
                outcome_row("extra", "confident")]  # not trained: not exported, counted in the report
    pq.write_table(pa.Table.from_pylist(outcomes, schema=OUTCOME_SCHEMA), run / "outcomes.parquet")

    assert interop.main(["export-trl", str(run), "--output", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "_report.json").read_text())
    assert report["source_kind"] == "run" and report["rows"] == 2
    assert report["outcomes"] == {"trained": 3, "confident": 1}
    assert "no ok entry in the label cache" in _skipped(tmp_path / "out")["err0"]
    ds = datasets.load_from_disk(str(tmp_path / "out" / "hf"))
    assert ds["id"] == ["ok", "err1"] and ds["labels"] == [[True, False], [True, True, True]]


MS_ROWS = [
    # A Math-Shepherd row with Monte-Carlo labels: a "+" after the first "-" (kept as the first error only).
    {"input": "Tom has 3 apples and buys 2 more. How many? Step 1: 3 + 2 = 6. ки\nStep 2: He has 5. ки\n"
              "Step 3: The answer is: 5 ки",
     "label": "Tom has 3 apples and buys 2 more. How many? Step 1: 3 + 2 = 6. -\nStep 2: He has 5. +\n"
              "Step 3: The answer is: 5 +", "task": "GSM8K"},
    {"input": "What is 1 + 1? Step 1: 1 + 1 = 2. ки\nStep 2: The answer is: 2 ки",
     "label": "What is 1 + 1? Step 1: 1 + 1 = 2. +\nStep 2: The answer is: 2 +", "task": "GSM8K"},
    {"input": "No marker here. 1 + 1 = 2 ки", "label": "No marker here. 1 + 1 = 2 +", "task": "GSM8K"},
    {"input": "Q? Step 1: a ки\nStep 2: b ки", "label": "Q? Step 1: a +\nStep 2: b ", "task": "MATH"},
    {"input": "Q? Step 1: a ки", "label": "Q? Step 1: a ?", "task": "MATH"},
    {"label": "only a label"},
]


def test_math_shepherd_sample_to_pool(tmp_path, capsys):
    src = tmp_path / "math_shepherd.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in MS_ROWS) + "{not json\n")
    assert interop.main(["import-math-shepherd", str(src), "--output", str(tmp_path / "ms")]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "ms" / "pool.parquet") in printed and str(tmp_path / "ms" / "_skipped.jsonl") in printed
    report = json.loads((tmp_path / "ms" / "_report.json").read_text())
    assert report["rows"] == 2 and report["skipped"] == 5 and report["labels_not_first_error_shape"] == 1
    assert _pool_rows(tmp_path / "ms" / "pool.parquet") == [
        {"id": "math_shepherd-0", "question": "Tom has 3 apples and buys 2 more. How many?",
         "steps": ["Step 1: 3 + 2 = 6.", "Step 2: He has 5.", "Step 3: The answer is: 5"], "first_error_step": 0},
        {"id": "math_shepherd-1", "question": "What is 1 + 1?",
         "steps": ["Step 1: 1 + 1 = 2.", "Step 2: The answer is: 2"], "first_error_step": -1}]
    reasons = list(_skipped(tmp_path / "ms").values())
    assert reasons[0].startswith("cannot tell the question from the first step")
    assert reasons[1].startswith("label does not line up with input")
    assert reasons[2] == "label has '?' at step tag 0, not '+' or '-'"
    assert reasons[3] == "missing input"
    assert reasons[4].startswith("bad JSON on line 7")


def test_import_trl_bad_rows_are_skipped_with_reasons(tmp_path, capsys):
    rows = [{"prompt": "Q?", "completions": ["a.", "b."], "labels": [True, False]},
            {"prompt": "Q?", "completions": ["a.", "b."], "labels": [True]},
            {"prompt": "Q?", "completions": ["a."], "labels": ["yes"]},
            {"prompt": [{"role": "user", "content": "Q?"}], "completions": ["a."], "labels": [True]},
            {"prompt": "Q?", "completions": ["a.", "  "], "labels": [True, True]},
            {"prompt": "Q?", "labels": [True]},
            {"id": "x", "prompt": "Q?", "completions": ["a."], "labels": [1]},
            {"id": "x", "prompt": "Q2?", "completions": ["b."], "labels": [0]}]
    src = tmp_path / "trl.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = interop.import_trl(str(src), str(tmp_path / "pool"))
    assert report["rows"] == 2 and report["skipped"] == 6
    assert [r["id"] for r in _pool_rows(tmp_path / "pool")] == ["trl-0", "x"]
    assert list(_skipped(tmp_path / "pool").values()) == [
        "1 labels for 2 completions", "label 0 must be true/false (or 0/1), got str 'yes'",
        "conversational prompt (a list of messages) is not supported: give the question text",
        "step 1 is empty after normalisation", "missing completions", "duplicate id 'x' (first at trl.jsonl#6)"]
    assert interop.main(["import-trl", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "input not found" in capsys.readouterr().err


def _processbench_pool(tmp_path, n: int = 4) -> Path:
    """The first n rows with an error and the first n without, from ProcessBench gsm8k (read in place)."""
    if not PROCESSBENCH_GSM8K.exists():
        pytest.skip(f"no shared data at {PROCESSBENCH_GSM8K}")
    wrong, right = [], []
    with open(PROCESSBENCH_GSM8K) as f:
        for line in f:
            r = json.loads(line)
            (right if r["label"] == -1 else wrong).append(r)
            if len(wrong) >= n and len(right) >= n:
                break
    rows = wrong[:n] + right[:n]
    pool = [{"id": r["id"], "question": r["problem"], "steps": r["steps"], "first_error_step": r["label"]}
            for r in rows]
    path = tmp_path / "processbench_gsm8k_head.parquet"
    pq.write_table(pa.Table.from_pylist(pool, schema=POOL_SCHEMA), path)
    return path


def test_trl_prm_trainer_accepts_the_export(tmp_path, tiny_backbone_dir):
    """TRL's own PRMTrainer (trl 1.13) on the export of real ProcessBench rows, with the tiny backbone's real
    tokenizer: its tokenize_row gives one labelled token per step carrying the step's label, and one optimizer step
    runs on it."""
    prm = pytest.importorskip("trl.experimental.prm", reason="trl with the experimental PRM trainer (<= 1.13)")
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    report = interop.export_trl(str(_processbench_pool(tmp_path)), str(tmp_path / "trl"))
    assert report["rows"] == 8 and report["skipped"] == 0
    ds = datasets.load_from_disk(str(tmp_path / "trl" / "hf"))
    assert sum(False in labels for labels in ds["labels"]) == 4 and sum(all(labels) for labels in ds["labels"]) == 4
    model = AutoModelForTokenClassification.from_pretrained(tiny_backbone_dir, num_labels=2)
    args = prm.PRMConfig(output_dir=str(tmp_path / "prm"), report_to=[], use_cpu=True, max_steps=1, max_length=2048,
                         per_device_train_batch_size=2, save_strategy="no", disable_tqdm=True)
    trainer = prm.PRMTrainer(model=model, args=args, train_dataset=ds,
                             processing_class=AutoTokenizer.from_pretrained(tiny_backbone_dir))
    tokenized = trainer.train_dataset
    assert set(tokenized.column_names) == {"input_ids", "labels"}
    for row, tok in zip(ds, tokenized):
        read = [y for y in tok["labels"] if y != -100]  # the step separators' labels, in order
        assert len(tok["input_ids"]) == len(tok["labels"]) and read
        assert read == [int(y) for y in row["labels"]][: len(read)]
        if len(tok["input_ids"]) < args.max_length:  # not truncated: every step is there
            assert len(read) == len(row["labels"])
    before = [p.detach().clone() for p in model.parameters()]
    assert trainer.train().global_step == 1
    assert any((a != p).any() for a, p in zip(before, model.parameters()))
