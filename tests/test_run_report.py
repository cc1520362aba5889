"""The active run's report (drivers/run_report.py): the selection curve and verdict on hand-made outcomes, and the
report written from a run directory's files."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from actprm_ray.drivers.run_report import selection_by_version, trainer_time, verdict, write_run_report


def _row(version: int, outcome: str, correct: int = -1) -> dict:
    return {"id": f"r{version}-{outcome}-{correct}", "outcome": outcome, "model_version": version,
            "pseudo_label_correct": correct}


def test_selection_curve_in_equal_parts_ordered_by_version():
    rows = ([_row(0, "trained")] * 4 +                                            # v0: all labelled
            [_row(3, "trained"), _row(3, "confident", 1), _row(4, "confident", 0), _row(4, "confident", -1)] +
            [_row(9, "invalid_input"), _row(9, "not_reached")])                  # no selection decision: left out
    curve = selection_by_version(rows, bins=2)
    assert [b["rows"] for b in curve] == [4, 4] and [b["rows_before"] for b in curve] == [0, 4]
    assert curve[0] == {"versions": [0, 0], "rows_before": 0, "rows": 4, "label_rate": 1.0, "trust": 0.0,
                        "trusted_accuracy": None, "trusted_judged": 0}
    # 1 of 4 labelled, 3 trusted; of those, 2 have a known label and 1 of them was right.
    assert curve[1]["versions"] == [3, 4] and curve[1]["label_rate"] == 0.25 and curve[1]["trust"] == 0.75
    assert curve[1]["trusted_accuracy"] == 0.5 and curve[1]["trusted_judged"] == 2
    assert selection_by_version([_row(0, "invalid_input")]) == []


def test_verdict_and_trainer_idle_share():
    summary = {"labels_used": 600, "rows_read": 2000, "label_rate": 0.3, "trust_pct": 68.5,
               "pseudo_label_accuracy": 0.912, "trainer": {"busy_s": 30.0, "phase_s": {"wait": 10.0, "publish": 0.0}}}
    assert verdict(summary) == "labelled 600 of 2000 rows (30.0%), trusted 68.5%, pseudo-label accuracy 91.2%"
    assert verdict(summary | {"pseudo_label_accuracy": None}).endswith("pseudo-label accuracy n/a (no oracle)")
    assert trainer_time(summary)["idle_pct"] == 25.0


def test_report_from_a_run_directory(tmp_path):
    rows = [_row(v, "trained" if v < 3 else "confident", 1) for v in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "outcomes.parquet")
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 1.0 / s, "final": False}) + "\n" for s in range(1, 9)) +
        json.dumps({"step": 8, "loss": 0.1, "final": True}) + "\n")
    summary = {"labels_used": 3, "rows_read": 6, "label_rate": 0.5, "trust_pct": 50.0, "pseudo_label_accuracy": 1.0,
               "outcomes": {"trained": 3, "confident": 3}, "model_versions_published": 5, "wall_time_s": 12.0,
               "lag_histogram": {"0": 2, "1": 1}, "audit": {"audited_rows": 0},
               "trainer": {"busy_s": 3.0, "optimizer_steps": 8, "phase_s": {"wait": 1.0}},
               "stage_rows_per_s": {"score": 10.0, "label": None, "train": 2.0, "end_to_end": 0.5}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    report = write_run_report(tmp_path)
    text = report.read_text()
    assert "labelled 3 of 6 rows (50.0%), trusted 50.0%, pseudo-label accuracy 100.0%" in text
    assert "| trained | 3 | 50.0 |" in text and "steps 3.0, wait 1.0" in text
    for png in ("selection.png", "loss.png", "pipeline.png"):
        assert (report.parent / png).stat().st_size > 5000 and f"({png})" in text
