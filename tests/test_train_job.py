"""jobs/train.py: the label rules (pure) and stage-2 training from a real loop checkpoint (Ray Train)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from actprm_ray.config import load_config
from actprm_ray.data.rows import check_hard_labels
from actprm_ray.data.step_format import DEFAULT_SEP, DEFAULT_SYSTEM_PROMPT, labels_from_first_error
from actprm_ray.data.synthetic import generate_pool
from actprm_ray.pipeline.filter import CarryCanonicalizeStage
from actprm_ray.drivers.supervised import attach_labels, parse_train_args, run_supervised

REPO = Path(__file__).resolve().parents[1]


# -- pure ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("labels, m, ok", [
    ([1, 1, 0], 4, True),  # first error at step 2; steps after it are dropped by the trainer
    ([1, 1, 1, 1], 4, True),
    ([1, 1], 4, True),  # an all-correct prefix
    ([0], 1, True),
    ([], 3, False),
    ([1, 0, 1], 3, False),  # labels after the first error
    ([1, 0, 0], 3, False),
    ([1, 1, 1, 1], 3, False),  # more labels than steps
    ([1, 2], 3, False),
])
def test_check_hard_labels(labels, m, ok):
    assert (check_hard_labels(labels, m) == "") == ok


def test_attach_labels_cuts_to_visible_steps(tiny_prm, tmp_path):
    tiny_prm.tokenizer.save_pretrained(tmp_path)
    steps = ["one two three four five six", "seven eight nine ten", "eleven twelve", "thirteen"]
    full = CarryCanonicalizeStage(str(tmp_path), sep=DEFAULT_SEP, system_prompt=DEFAULT_SYSTEM_PROMPT,
                                  max_length=None, carry=("hard_labels",))
    rows = {"id": np.array(["hard", "fes", "none", "bad"]), "question": np.array(["q"] * 4, dtype=object),
            "steps": np.empty(4, dtype=object), "hard_labels": np.empty(4, dtype=object),
            "first_error_step": np.array([None, 3, None, None], dtype=object)}
    for i in range(4):
        rows["steps"][i] = steps
    for i, h in enumerate([[1, 1, 1, 0], None, None, [1, 0, 1, 1]]):
        rows["hard_labels"][i] = h
    sep_pos = full(rows)["readout_positions"][0]
    # Truncate right after the second separator: two visible steps.
    cut = CarryCanonicalizeStage(str(tmp_path), sep=DEFAULT_SEP, system_prompt=DEFAULT_SYSTEM_PROMPT,
                                 max_length=int(sep_pos[1]) + 1, carry=("hard_labels",))
    out = attach_labels(cut(rows))
    assert out["label_status"].tolist() == ["ok", "ok", "failed", "failed"], out["label_reason"]
    assert [list(x) for x in out["hard_labels"]] == [[1, 1], [1, 1], [], []]  # error at step 3 is invisible
    assert out["first_error_step"].tolist()[:2] == [-1, -1]
    assert "no label" in out["label_reason"][2] and "after the first error" in out["label_reason"][3]
    full_out = attach_labels(full(rows))
    assert [list(x) for x in full_out["hard_labels"]][:2] == [[1, 1, 1, 0], [1, 1, 1, 0]]
    assert full_out["first_error_step"].tolist()[:2] == [3, 3]


def test_parse_train_args():
    init, cfg = parse_train_args(["--init_checkpoint", "ck", "data.pool=x.parquet", "train.lr=0.001"])
    assert init == "ck" and cfg.data.pool == "x.parquet" and cfg.train.lr == 0.001
    init, cfg = parse_train_args([])
    assert init is None and cfg.data.pool == ""
    with pytest.raises(SystemExit):
        parse_train_args(["--init", "x"])  # no silent prefix matching of flags


def test_train_job_help_runs_without_ray():
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--init_checkpoint" in r.stdout


# -- Ray Train -------------------------------------------------------------------------------------------------------
def _labelled_set(path: Path) -> None:
    """24 labelled synthetic rows (half via hard_labels, half via first_error_step) + 3 rows that cannot train."""
    rows = []
    for i, r in enumerate(generate_pool(24, seed=7)):
        k = r["first_error_step"]
        hard = labels_from_first_error(k, len(r["steps"])) if i % 2 == 0 else None
        rows.append({"id": r["id"], "question": r["question"], "steps": r["steps"], "hard_labels": hard,
                     "first_error_step": None if i % 2 == 0 else k})
    rows.append({"id": "bad-labels", "question": "q", "steps": ["a", "b", "c"], "hard_labels": [1, 0, 1],
                 "first_error_step": None})
    rows.append({"id": "no-label", "question": "q", "steps": ["a"], "hard_labels": None, "first_error_step": None})
    rows.append({"id": "empty-steps", "question": "q", "steps": [], "hard_labels": [1], "first_error_step": None})
    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("steps", pa.list_(pa.string())),
                        ("hard_labels", pa.list_(pa.int64())), ("first_error_step", pa.int64())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _mean_bce(model, rows) -> float:
    """Mean BCE of µ against the row labels (METHOD §1: input cut after the first error), in-process."""
    from actprm_ray.data.collate import collate_encoded
    from actprm_ray.data.step_format import encode_trajectory

    enc = []
    for r in rows:
        k = r["first_error_step"] if r["first_error_step"] is not None else (
            r["hard_labels"].index(0) if 0 in r["hard_labels"] else -1)
        labels = labels_from_first_error(k, len(r["steps"]))
        e = encode_trajectory(model.tokenizer, r["question"], r["steps"], sep=DEFAULT_SEP,
                              system_prompt=DEFAULT_SYSTEM_PROMPT, labels=labels)
        enc.append({"input_ids": e.input_ids, "readout_positions": e.readout_positions, "labels": e.labels})
    batch = collate_encoded(enc, model.tokenizer.pad_token_id or 0)
    with torch.no_grad():
        mu, _ = model.eval().score(batch)
    return float(torch.nn.functional.binary_cross_entropy(mu.clamp(1e-6, 1 - 1e-6), batch["labels"]))


@pytest.mark.ray
@pytest.mark.extended  # a loop run then a train run, ~2 min: CI budget
def test_stage2_from_loop_checkpoint(ray_local, tmp_path):
    from actprm_ray.model.ensemble_prm import EnsemblePRM
    from actprm_ray.drivers.active import run_active

    # Stage 1: a real (tiny) run of the streaming loop; its checkpoint is what stage 2 starts from.
    stage1 = run_active(load_config(overrides=[
        f"run.output_dir={tmp_path}", "run.name=stage1", "data.synthetic_rows=16", "model.n_heads=4",
        "train.micro_batch_size=8"]))
    loop_ckpt = Path(stage1["checkpoint"]).parent  # the Ray Train checkpoint dir (model/ + trainer_state.json)
    before = EnsemblePRM.from_pretrained(loop_ckpt / "model")

    data = tmp_path / "labelled.parquet"
    _labelled_set(data)
    cfg = load_config(overrides=[f"run.output_dir={tmp_path}", "run.name=stage2", f"data.pool={data}",
                                 "train.lr=0.0005", "train.warmup_steps=1", "train.micro_batch_size=8"])
    summary = run_supervised(cfg, init_checkpoint=str(loop_ckpt))

    assert summary["identity_holds"] and summary["rows_read"] == 27
    assert summary["outcomes"]["trained"] == 24
    assert summary["outcomes"]["label_failed"] == 2 and summary["outcomes"]["invalid_input"] == 1
    assert any("after the first error" in r for r in summary["failure_reasons"])
    assert summary["optimizer_steps"] == 3  # 24 trainable rows / 8 per step

    # Stage 2 started from the loop checkpoint (a copy of it) and kept its anchors (the fresh stage-1 heads).
    init = EnsemblePRM.from_pretrained(tmp_path / "stage2" / "init")
    after = EnsemblePRM.from_pretrained(summary["checkpoint"])
    for name, p in before.head_state().items():
        assert torch.equal(init.head_state()[name], p)
        if name.startswith("anchor_"):
            assert torch.equal(after.head_state()[name], p), name
    assert not torch.equal(after.heads.w1, before.heads.w1)
    emb = "embed_tokens.weight"
    assert not torch.equal(dict(after.backbone.named_parameters())[emb], dict(before.backbone.named_parameters())[emb])

    # The same loss as the loop, on these labels: training lowered it on the training rows.
    rows = [r for r in pq.read_table(data).to_pylist() if r["id"].startswith("syn-")]
    assert _mean_bce(after, rows) < _mean_bce(before, rows)
