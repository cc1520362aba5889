"""Bad input rows end as invalid_input with a reason naming the problem; the run completes and every row read
has exactly one outcome. First per row (reader + CanonicalizeStage, no Ray) for every kind of tests/bad_inputs.py,
then one run of each job over the whole corpus: the loop, the filter, the label job, supervised training (Ray),
evaluate (in-process).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from bad_inputs import (DUPLICATED_ID, LABEL_COLUMN, MAX_LENGTH, NO_LABEL, POOL_KINDS, PROCESSBENCH_KINDS, SCORED,
                        SELECTED_BAD, SKIPPED, TOO_LONG, TRAIN_LABEL_KINDS, UNSCORABLE, VALID, write_pool_corpus,
                        write_processbench_corpus)

from actprm_ray.config import load_config
from actprm_ray.data.rows import NO_ORACLE
from actprm_ray.data.shards import LABEL_COLUMNS, index_pool, read_chunk
from actprm_ray.data.step_format import DEFAULT_SEP, DEFAULT_SYSTEM_PROMPT
from actprm_ray.eval.samples import EvalDataError
from actprm_ray.pipeline import outcomes as oc
from actprm_ray.pipeline.stages import CanonicalizeStage
from script_loader import load_script

REPO = Path(__file__).resolve().parents[1]
TOO_LONG_REASON = rf"^no step separator survives truncation to {MAX_LENGTH} tokens$"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    d = tmp_path_factory.mktemp("bad_pool")
    return d, write_pool_corpus(d)


@pytest.fixture(scope="module")
def checkpoint(tiny_backbone_dir, tmp_path_factory) -> Path:
    from actprm_ray.model.ensemble_prm import EnsemblePRM, PRMConfig

    model = EnsemblePRM.from_backbone(tiny_backbone_dir, PRMConfig(n_heads=4, init_seed=0, sep=DEFAULT_SEP,
                                                                   system_prompt=DEFAULT_SYSTEM_PROMPT))
    return model.save_pretrained(tmp_path_factory.mktemp("bad_ckpt") / "ckpt")


def verdict(kind: str, job: str) -> tuple[bool, str | bool]:
    """(valid, reason regex) for an invalid row, (valid, has a label) for a valid one, as `job` sees `kind`."""
    expect = POOL_KINDS.get(kind, VALID)
    if expect == TOO_LONG:
        return (True, True) if job == "label" else (False, TOO_LONG_REASON)
    if expect == SELECTED_BAD:
        return (False, r"^selected must be true or false, got str 'yes'$") if job == "label" else (True, True)
    if kind == "duplicate_id" and job == "filter":
        return True, True  # the filter keeps flat memory and does not look for repeated ids (its docstring)
    if expect == LABEL_COLUMN:
        assert job != "train", "supervised training's verdict on the label columns is TRAIN_LABEL_KINDS"
        return True, True  # a job that ignores the label columns labels the row by its first_error_step
    if expect in (VALID, NO_LABEL):
        return True, expect == VALID
    return False, expect


def _assert_reason(row_id: str, kind: str, reason: str, pattern: str) -> None:
    assert re.search(pattern, reason), f"{row_id} ({kind}): reason {reason!r} does not match {pattern!r}"


# -- per row, no Ray ----------------------------------------------------------------------------------------------
def test_every_kind_gets_its_reason_from_reader_and_canonicalize(corpus, checkpoint):
    d, kinds = corpus
    index = index_pool(str(d))
    assert sorted(index.ids) == sorted(kinds)  # every row read once, under the id the jobs account it by
    stage = CanonicalizeStage(str(checkpoint), sep=DEFAULT_SEP, system_prompt=DEFAULT_SYSTEM_PROMPT,
                              max_length=MAX_LENGTH)
    rows = {}
    for c in index.chunks:
        read = read_chunk({k: np.asarray([v]) for k, v in asdict(c).items()}, duplicates=index.duplicates)
        # One type per column whatever the shard, so Ray never converts values when a batch spans two blocks.
        assert all(q is None or isinstance(q, str) for q in read["question"])
        assert all(s is None or (isinstance(s, list) and all(isinstance(x, str) for x in s)) for s in read["steps"])
        assert all(k is None or type(k) is int for k in read["first_error_step"])
        out = stage(read)
        for i, rid in enumerate(out["id"]):
            rows[rid] = {k: out[k][i] for k in ("valid", "invalid_reason", "oracle_first_error_step", "sep_removed",
                                                "num_steps")}
    assert sorted(rows) == sorted(kinds)
    for rid, kind in kinds.items():
        r = rows[rid]
        valid, detail = verdict(kind, "canonicalize")
        assert bool(r["valid"]) == valid, (rid, kind, r["invalid_reason"])
        if not valid:
            _assert_reason(rid, kind, r["invalid_reason"], detail)
        else:
            assert r["num_steps"] > 0 and (r["oracle_first_error_step"] != NO_ORACLE) == detail, (rid, kind)
    # The documented acceptances, in detail.
    by_kind = {kind: rows[rid] for rid, kind in kinds.items()}
    assert by_kind["separator_in_step"]["sep_removed"] == 1 and by_kind["separator_in_question"]["sep_removed"] == 1
    assert 0 < by_kind["long_tail"]["num_steps"] < 30  # cut at max_length ...
    assert by_kind["long_tail"]["oracle_first_error_step"] == -1  # ... so the error at step 30 is invisible
    assert by_kind["parquet_fes_whole_float"]["oracle_first_error_step"] == 1


def train_verdict(kind: str) -> tuple[str, str]:
    """(outcome, reason regex) of supervised training (jobs/train.py) for `kind`; reason "" for trained rows."""
    if kind in TRAIN_LABEL_KINDS:
        return TRAIN_LABEL_KINDS[kind]
    valid, detail = verdict(kind, "train")
    if not valid:
        return oc.INVALID_INPUT, detail
    if detail:
        return oc.TRAINED, ""
    return oc.LABEL_FAILED, r"^row has no label: needs hard_labels or first_error_step$"


def test_every_kind_gets_its_label_verdict_from_reader_and_labelled_canonicalize(corpus, checkpoint):
    """Supervised training's per-row path: the reader with the label columns, then LabelledCanonicalizeStage."""
    from actprm_ray.drivers.supervised import TRAIN_COLUMNS, LabelledCanonicalizeStage

    d, kinds = corpus
    index = index_pool(str(d))
    stage = LabelledCanonicalizeStage(str(checkpoint), sep=DEFAULT_SEP, system_prompt=DEFAULT_SYSTEM_PROMPT,
                                      max_length=MAX_LENGTH, carry=LABEL_COLUMNS)
    rows = {}
    for c in index.chunks:
        out = stage(read_chunk({k: np.asarray([v]) for k, v in asdict(c).items()}, columns=TRAIN_COLUMNS,
                               duplicates=index.duplicates))
        for i, rid in enumerate(out["id"]):
            rows[rid] = {k: out[k][i] for k in ("valid", "invalid_reason", "label_status", "label_reason",
                                                "label_source", "judge_tokens")}
    assert sorted(rows) == sorted(kinds)
    for rid, kind in kinds.items():
        r, (outcome, pattern) = rows[rid], train_verdict(kind)
        if outcome == oc.INVALID_INPUT:
            assert not r["valid"], (rid, kind)
            _assert_reason(rid, kind, r["invalid_reason"], pattern)
        else:
            assert r["valid"] and r["label_status"] == ("ok" if outcome == oc.TRAINED else "failed"), (rid, kind, r)
            _assert_reason(rid, kind, r["label_reason"], pattern or "^$")
    assert rows["hl-given"]["label_source"] == "judge:x" and rows["jt-float"]["judge_tokens"] == 120
    assert (rows["extra"]["label_source"], rows["extra"]["judge_tokens"]) == ("dataset", 0)  # the set has neither


def test_a_file_that_is_not_parquet_fails_naming_it(tmp_path):
    """No row of it can even be counted, so the job stops at once, before any work, with the file named."""
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(ValueError, match=r"broken\.parquet: not a readable Parquet file"):
        index_pool(str(tmp_path))


# -- one run per job ---------------------------------------------------------------------------------------------
@pytest.mark.ray
def test_loop_accounts_every_bad_row(ray_local, corpus, tmp_path):
    from actprm_ray.drivers.active import run_active

    d, kinds = corpus
    cfg = load_config(None, [
        "run.name=bad-inputs", f"run.output_dir={tmp_path}", f"data.pool={d}", "selection.mode=all",
        "model.n_heads=4", f"model.max_length={MAX_LENGTH}", "train.lr=1e-3", "train.warmup_steps=2",
        "train.total_steps=50", "train.micro_batch_size=8", "train.publish_every=1", "train.checkpoint_every=5",
        "pipeline.status_every_s=5", "pipeline.score_batch_size=8", "pipeline.label_batch_size=8"])
    summary = run_active(cfg)
    assert summary["identity_holds"] and summary["rows_read"] == len(kinds)
    outcomes = {r["id"]: r for r in pq.read_table(f"{summary['run_dir']}/outcomes.parquet").to_pylist()}
    assert sorted(outcomes) == sorted(kinds)
    for rid, kind in kinds.items():
        o = outcomes[rid]
        valid, detail = verdict(kind, "loop")
        if not valid:
            assert o["outcome"] == oc.INVALID_INPUT, (rid, kind, o)
            _assert_reason(rid, kind, o["reason"], detail)
        elif detail:  # selection.mode=all: every valid row is labelled by the oracle and trained
            assert o["outcome"] == oc.TRAINED, (rid, kind, o)
        else:
            assert (o["outcome"], o["reason"]) == (oc.LABEL_FAILED, "row has no first_error_step to reveal"), (rid, kind)


@pytest.mark.ray
def test_train_job_accounts_every_bad_row(ray_local, corpus, checkpoint, tmp_path, capsys):
    from actprm_ray.drivers.supervised import run_supervised

    d, kinds = corpus
    cfg = load_config(None, [
        "run.name=bad-inputs-train", f"run.output_dir={tmp_path}", f"data.pool={d}", f"model.max_length={MAX_LENGTH}",
        "train.lr=1e-3", "train.warmup_steps=2", "train.micro_batch_size=8", "train.checkpoint_every=5",
        "pipeline.score_batch_size=8"])
    summary = run_supervised(cfg, init_checkpoint=str(checkpoint))
    run_dir = tmp_path / "bad-inputs-train"
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[train]")]
    assert said[:3] == [f"[train] run dir {run_dir}", f"[train] init {checkpoint}", "[train] plan:"], said
    assert set(summary) == {"run_dir", "init", "data", "rows_read", "outcomes", "identity_holds", "failure_reasons",
                            "optimizer_steps", "final_loss", "wall_time_s", "checkpoint", "config"}
    assert json.loads((run_dir / "summary.json").read_text())["rows_read"] == len(kinds)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "init" / "config.json").is_file()
    assert summary["identity_holds"] and summary["rows_read"] == len(kinds)
    outcomes = {r["id"]: r for r in pq.read_table(f"{summary['run_dir']}/outcomes.parquet").to_pylist()}
    assert sorted(outcomes) == sorted(kinds)
    for rid, kind in kinds.items():
        outcome, pattern = train_verdict(kind)
        assert outcomes[rid]["outcome"] == outcome, (rid, kind, outcomes[rid])
        _assert_reason(rid, kind, outcomes[rid]["reason"], pattern or "^$")
    assert outcomes["hl-given"]["label_source"] == "judge:x"  # the set's own columns reach the outcome table


@pytest.mark.ray
def test_filter_accounts_every_bad_row(ray_local, corpus, checkpoint, tmp_path):
    from actprm_ray.drivers.filter import parse_filter_args, run_filter

    d, kinds = corpus
    out = tmp_path / "filtered"
    args, cfg = parse_filter_args(["--checkpoint", str(checkpoint), "--input", str(d), "--output", str(out),
                                   "--write_all", "--chunk_rows", "16", f"model.max_length={MAX_LENGTH}"])
    summary = run_filter(cfg, args)
    # The filter does not rename repeated ids: the second 'dup-1' is scored under its own id.
    rows = sorted((DUPLICATED_ID if k == "duplicate_id" else rid, k) for rid, k in kinds.items())
    assert summary["read"] == len(rows) == summary["scored"] + summary["invalid"]
    invalid = [(r["id"], r["invalid_reason"]) for r in pq.read_table(out / "invalid").to_pylist()]
    scored = pq.read_table(out / "retained").to_pylist() + pq.read_table(out / "discarded").to_pylist()
    assert sorted([i for i, _ in invalid] + [r["id"] for r in scored]) == [rid for rid, _ in rows]
    reasons = dict(invalid)
    fes = {r["id"]: r["first_error_step"] for r in scored}
    for rid, kind in rows:
        valid, detail = verdict(kind, "filter")
        if not valid:
            _assert_reason(rid, kind, reasons[rid], detail)
        else:
            assert rid not in reasons and (fes[rid] is not None) == detail, (rid, kind)
    assert fes["long-tail"] == -1  # the error past the cut is invisible, as in the loop


@pytest.mark.ray
def test_label_job_accounts_every_bad_row(ray_local, corpus, tmp_path):
    from actprm_ray.drivers.label_job import parse_label_args, run_label

    d, kinds = corpus
    out = tmp_path / "labelled"
    args, cfg = parse_label_args(["--input", str(d), "--output", str(out), "pipeline.label_batch_size=8"])
    summary = run_label(cfg, args)
    assert set(summary) == {"input", "output", "rows_read", "rows", "status", "identity_holds", "invalid_reasons",
                            "cache_hits", "judge_prompt_tokens", "judge_generated_tokens", "failure_rate",
                            "cost_model_tokens_N_times_C", "rows_paid_this_run", "budget", "judge", "wall_time_s"}
    assert summary["output"] == str(out) and (out / "config.yaml").is_file()
    assert json.loads((out / "label_summary.json").read_text())["rows"] == len(kinds)
    assert summary["identity_holds"] and summary["rows_read"] == summary["rows"] == len(kinds)
    rows = {r["id"]: r for r in pq.read_table(out / "labelled").to_pylist()}
    assert sorted(rows) == sorted(kinds)
    for rid, kind in kinds.items():
        r = rows[rid]
        valid, detail = verdict(kind, "label")
        if not valid:
            assert r["label_status"] == oc.INVALID_INPUT and r["judge_tokens"] == 0, (rid, kind, r)
            _assert_reason(rid, kind, r["label_reason"], detail)
        elif detail:
            assert r["label_status"] == "ok" and len(r["hard_labels"]) == len(r["steps"]) > 0, (rid, kind, r)
        else:
            assert (r["label_status"], r["label_reason"]) == ("failed", "row has no first_error_step to reveal")
    assert sum(summary["invalid_reasons"].values()) == summary["status"][oc.INVALID_INPUT]


def test_evaluate_reports_every_bad_processbench_row(tmp_path):
    data = tmp_path / "processbench"
    kinds = write_processbench_corpus(data)
    out = tmp_path / "eval"
    job = load_script("jobs/evaluate.py")
    assert job.main(["eval.checkpoint=tiny", "eval.benchmarks=[processbench]", f"eval.data={data}", f"eval.out={out}",
                     "pipeline.score_batch_size=4"]) == 0
    m = json.loads((out / "metrics.json").read_text())["benchmarks"]["processbench"]
    skipped = {s["source"] if s["source"] in kinds else s["id"]: s["reason"] for s in m["data"]["skipped"]}
    predictions = {p["id"]: p for p in map(json.loads, (out / "predictions.jsonl").open())}
    # Identity: every line of the four files is either skipped at load or has a prediction row.
    assert sorted(list(skipped) + list(predictions)) == sorted(kinds)
    for rid, kind in kinds.items():
        where, pattern = PROCESSBENCH_KINDS.get(kind, (SCORED, ""))
        if where == SKIPPED:
            _assert_reason(rid, kind, skipped[rid], pattern)
        elif where == UNSCORABLE:
            assert predictions[rid]["pred"] is None, (rid, kind)
            _assert_reason(rid, kind, predictions[rid]["unscorable"], pattern)
        else:
            assert predictions[rid]["pred"] is not None and len(predictions[rid]["step_mu"]) == 2, (rid, kind)
    assert m["scoring"]["unscorable"] == sum(PROCESSBENCH_KINDS.get(k, (SCORED,))[0] == UNSCORABLE for k in kinds.values())


def test_evaluate_refuses_a_row_without_a_required_field(tmp_path):
    """Documented policy (eval/samples.py): a missing field means a wrong file or format, so the load stops with
    file, line and field named, instead of skipping what might be every row."""
    from actprm_ray.eval.processbench import load_processbench

    write_processbench_corpus(tmp_path)
    with open(tmp_path / "math.jsonl", "a") as f:
        f.write(json.dumps({"id": "math-9", "problem": "p", "steps": ["a"]}) + "\n")
    with pytest.raises(EvalDataError, match=r"math\.jsonl:3: missing required field\(s\) \['label'\]"):
        load_processbench(tmp_path)
