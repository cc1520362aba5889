"""Benchmark loaders and adapters: counts on the real files, and bad input on small temporary files."""

import json
import re
from pathlib import Path

import pytest

from actprm_ray.eval.first_error import FORMATS, load_first_error, one_based_to_label
from actprm_ray.eval.prmbench import load_prmbench, strip_step_prefix
from actprm_ray.eval.processbench import load_processbench
from actprm_ray.config import shared_data_dir
from actprm_ray.eval.samples import EvalDataError, evenly_spaced, stratified_spread

DATA = shared_data_dir()


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Real files
# ---------------------------------------------------------------------------------------------------------------


def test_processbench_real_counts():
    res = load_processbench(DATA / "processbench")
    assert res.stats["per_subset"] == {"gsm8k": 400, "math": 1000, "olympiadbench": 1000, "omnimath": 1000}
    correct = {s: sum(x.label == -1 for x in res.samples if x.subset == s) for s in res.stats["per_subset"]}
    assert correct == {"gsm8k": 193, "math": 406, "olympiadbench": 339, "omnimath": 241}  # METHOD §9
    assert res.skipped == []
    assert all(-1 <= s.label < len(s.steps) for s in res.samples)


def test_prmbench_real_counts():
    res = load_prmbench(DATA / "prmbench" / "prmtest_classified")
    st = res.stats
    assert st["files"] == 25 and st["raw_rows"] == 6216  # the subset400 folder is not read (no recursion)
    assert st["unique_rows"] == 6211 and st["duplicates_dropped"] == 5
    assert st["extra_correct"] == 758
    assert st["samples"] == 6969 and len(res.samples) == 6969
    assert st["steps"] == 94203
    assert st["out_of_range_error_steps"] == 151 and st["rows_with_out_of_range"] == 100
    assert len({s.id for s in res.samples}) == 6969
    assert all(1 <= j <= len(s.steps) for s in res.samples for j in s.error_steps)
    assert all(s.error_steps == [] for s in res.samples if s.subset in ("correct", "multi_solutions"))
    # No step keeps a "Step k." numbering after loading ("Step 8 is redundant" is content, not numbering).
    numbered = re.compile(r"^\s*Step \d+\s*[.:]")
    assert not any(numbered.match(step) for s in res.samples for step in s.steps)


def test_prmbench_keeps_first_of_duplicates():
    # (multi_solutions, prm_test_p2_863) appears twice in the same file with different processes; the first
    # occurrence (sorted files, line order) is kept, as the official loader does.
    path = DATA / "prmbench" / "prmtest_classified" / "prm_test_p12_multi_solutions.jsonl"
    first = next(json.loads(line) for line in path.open() if '"prm_test_p2_863"' in line)
    res = load_prmbench(DATA / "prmbench" / "prmtest_classified")
    sample = next(s for s in res.samples if s.id == "multi_solutions_prm_test_p2_863")
    assert len(sample.steps) == len(first["modified_process"])


@pytest.mark.parametrize(
    "fmt, n, file",
    [
        ("big_bench_mistake", 2186, None),
        ("reasoneval_invalid", 159, "reasoneval_meta_reasoning/mr-math_invalid_errors.jsonl"),
        ("champ_fws", 540, "champ_fws/champ_fws.jsonl"),
        ("mr_gsm8k_partial", 590, "mr_gsm8k_partial/mr_gsm8k_wrong_solutions_subset.jsonl"),
    ],
)
def test_first_error_adapters_real_files(fmt, n, file):
    res = load_first_error(fmt)
    assert res.stats["samples"] == n and res.skipped == []
    assert all(-1 <= s.label < len(s.steps) for s in res.samples)
    if fmt == "reasoneval_invalid":
        # The label must agree with the file's own correctness field: -1 exactly for "correct" solutions.
        raw = [json.loads(line) for line in (DATA / "step_labeled_extra" / file).open()]
        assert [s.label == -1 for s in res.samples] == [r["model_output_solution_correctness"] == "correct" for r in raw]
        assert res.samples[0].steps[0].startswith("The problem asks")  # "1. " numbering stripped
    if fmt == "mr_gsm8k_partial":
        raw = [json.loads(line) for line in (DATA / "step_labeled_extra" / file).open()]
        assert [s.label for s in res.samples] == [r["model_output_solution_first_error_step"] - 1 for r in raw]
        # Numbering is stripped; a step whose only text is "Step k:" is kept as it is (it holds a label index).
        numbered = re.compile(r"^Step \d+:\s*\S")
        assert not any(numbered.match(st) for s in res.samples for st in s.steps)


def test_mr_ben_adapter_real_file():
    res = load_first_error("mr_ben")
    raw = json.loads((DATA / "step_labeled_extra" / "mr_ben" / "math.json").read_text())
    sols = [s for v in raw.values() for s in v]
    assert len(res.samples) == len(sols) == 918
    assert [s.label == -1 for s in res.samples] == [s["Model_Solution_Correctness"] == "correct" for s in sols]
    assert all(s.question.count("\n") >= 1 for s in res.samples)  # options appended


def test_big_bench_mistake_subsets_are_task_files():
    res = load_first_error("big_bench_mistake", limit=3)
    assert set(res.stats["per_subset"]) == {
        "dyck_languages", "logical_deduction", "multistep_arithmetic", "tracking_shuffled_objects", "word_sorting"}
    assert all(v == 3 for v in res.stats["per_subset"].values())


def test_limit_keeps_correct_rows_of_sorted_processbench():
    # ProcessBench puts most erroneous rows first; a --limit slice must still hold correct rows, in proportion:
    # olympiadbench has 339/1000 correct -> 3 of 10; gsm8k 193/400 -> round(4.8) = 5 of 10.
    res = load_processbench(DATA / "processbench", limit=10)
    n_correct = {sub: sum(s.label == -1 for s in res.samples if s.subset == sub) for sub in res.stats["per_subset"]}
    assert res.stats["per_subset"] == {"gsm8k": 10, "math": 10, "olympiadbench": 10, "omnimath": 10}
    assert n_correct["olympiadbench"] == 3 and n_correct["gsm8k"] == 5


# ---------------------------------------------------------------------------------------------------------------
# Small pure helpers
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Step 3. Add 2.", "Add 2."),
        ("step 12: so x = 4", "so x = 4"),
        ("12. Then divide", "Then divide"),
        ("57.0 is the quotient", "57.0 is the quotient"),  # a number, not numbering
        ("2.5 hours", "2.5 hours"),
        ("64.", "64."),  # nothing would be left: keep
        ("Step 4.", "Step 4."),
        ("No prefix here.", "No prefix here."),
    ],
)
def test_strip_step_prefix(raw, expected):
    assert strip_step_prefix(raw) == expected


def test_one_based_to_label():
    assert one_based_to_label(1) == (0, None)
    assert one_based_to_label("3") == (2, None)
    assert one_based_to_label("N/A") == (-1, None)
    assert one_based_to_label(None) == (-1, None)
    label, reason = one_based_to_label("two")
    assert label is None and "two" in reason


def test_evenly_spaced():
    assert evenly_spaced(list(range(10)), 3) == [0, 3, 6]
    assert evenly_spaced([1, 2], 5) == [1, 2]
    assert evenly_spaced([1, 2], None) == [1, 2]


def test_stratified_spread():
    # 8 "e" then 2 "c": limit 5 -> c gets max(1, round(5*2/10)) = 1, e gets round(5*8/10) = 4.
    items = ["e"] * 8 + ["c"] * 2
    picked = stratified_spread(list(enumerate(items)), 5, key=lambda x: x[1])
    assert [i for i, _ in picked] == [0, 2, 4, 6, 8]  # e at 0,2,4,6 (spread over 8), c at index 8
    # limit 1 with two strata: the at-least-one rule overshoots and is trimmed back to one item.
    assert len(stratified_spread(items, 1, key=lambda x: x)) == 1
    assert stratified_spread(items, None, key=lambda x: x) == items


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def _pb_row(i, steps, label):
    return {"id": f"gsm8k-{i}", "generator": "g", "problem": "p?", "steps": steps, "final_answer_correct": False, "label": label}


def test_processbench_missing_file_names_it(tmp_path):
    with pytest.raises(EvalDataError, match=r"gsm8k.*file not found.*gsm8k\.jsonl"):
        load_processbench(tmp_path)


def test_processbench_missing_field_names_it(tmp_path):
    row = _pb_row(0, ["a"], -1)
    del row["label"]
    _write_jsonl(tmp_path / "gsm8k.jsonl", [row])
    with pytest.raises(EvalDataError, match=r"gsm8k\.jsonl:1: missing required field\(s\) \['label'\]"):
        load_processbench(tmp_path, subsets=("gsm8k",))


def test_processbench_bad_rows_are_reported_and_skipped(tmp_path):
    rows = [
        _pb_row(0, ["a", "b"], 1),
        _pb_row(1, ["a", "b", "c"], 3),  # out of range (3 steps: -1..2)
        _pb_row(2, ["a"], -2),  # below -1
        _pb_row(3, ["a"], "0"),  # not an int
        _pb_row(4, "not a list", 0),
        "{not json",
        _pb_row(5, ["a"], -1),
    ]
    _write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    res = load_processbench(tmp_path, subsets=("gsm8k",))
    assert [s.id for s in res.samples] == ["gsm8k-0", "gsm8k-5"]
    reasons = {s["source"]: s["reason"] for s in res.skipped}
    assert set(reasons) == {"gsm8k.jsonl:2", "gsm8k.jsonl:3", "gsm8k.jsonl:4", "gsm8k.jsonl:5", "gsm8k.jsonl:6"}
    assert "out of range" in reasons["gsm8k.jsonl:2"] and "out of range" in reasons["gsm8k.jsonl:3"]
    assert "must be an int" in reasons["gsm8k.jsonl:4"]
    assert "invalid JSON" in reasons["gsm8k.jsonl:6"]
    assert res.skipped[0]["id"] == "gsm8k-1"


def _prm_row(idx, cat, steps, error_steps, **extra):
    return {"idx": idx, "classification": cat, "modified_question": "q", "modified_process": steps,
            "error_steps": error_steps, "original_question": "oq", "original_process": ["o1", "o2"], **extra}


def test_prmbench_rules_on_a_small_folder(tmp_path):
    _write_jsonl(tmp_path / "a_redundency.jsonl", [
        _prm_row("p1", "redundency", ["Step 1. x", "Step 2. y", "Step 3. z"], [2, 7]),  # 7 out of range
        _prm_row("p1", "redundency", ["other"], [1]),  # duplicate (classification, idx): dropped
    ])
    _write_jsonl(tmp_path / "b_circular.jsonl", [
        _prm_row("p1", "circular", ["1. a", "2. b"], [2]),  # same idx, other category: kept
        _prm_row("p2", "circular", ["a"], ["1"]),  # error_steps not ints: skipped
    ])
    (tmp_path / "sub").mkdir()
    _write_jsonl(tmp_path / "sub" / "ignored.jsonl", [_prm_row("p9", "circular", ["a"], [])])  # no recursion
    res = load_prmbench(tmp_path)
    ids = [s.id for s in res.samples]
    assert sorted(ids) == ["circular_p1", "correct_p1", "redundency_p1"]
    red = next(s for s in res.samples if s.id == "redundency_p1")
    assert red.steps == ["x", "y", "z"] and red.error_steps == [2]
    correct = next(s for s in res.samples if s.id == "correct_p1")
    assert correct.subset == "correct" and correct.question == "oq" and correct.error_steps == []
    assert res.stats["duplicates_dropped"] == 1 and res.stats["out_of_range_error_steps"] == 1
    assert len(res.skipped) == 1 and "error_steps" in res.skipped[0]["reason"]


def test_prmbench_missing_folder_and_field(tmp_path):
    with pytest.raises(EvalDataError, match="directory not found"):
        load_prmbench(tmp_path / "nope")
    row = _prm_row("p1", "circular", ["a"], [])
    del row["error_steps"]
    _write_jsonl(tmp_path / "x.jsonl", [row])
    with pytest.raises(EvalDataError, match=r"x\.jsonl:1: missing required field\(s\) \['error_steps'\]"):
        load_prmbench(tmp_path)


def test_first_error_bad_input(tmp_path):
    with pytest.raises(EvalDataError, match="unknown first-error format"):
        load_first_error("nope")
    with pytest.raises(EvalDataError, match="file not found"):
        load_first_error("champ_fws", tmp_path / "missing.jsonl")
    path = _write_jsonl(tmp_path / "c.jsonl", [
        {"id": "a", "problem": "p", "steps": ["s1", "s2"], "label": 1},
        {"id": "b", "problem": "p", "steps": ["s1"], "label": 4},
        {"id": "c", "problem": "p", "steps": ["s1"]},
    ])
    with pytest.raises(EvalDataError, match=r"c\.jsonl:3: missing required field\(s\) \['label'\]"):
        load_first_error("champ_fws", path)
    _write_jsonl(path, [{"id": "a", "problem": "p", "steps": ["s1", "s2"], "label": 1},
                        {"id": "b", "problem": "p", "steps": ["s1"], "label": 4}])
    res = load_first_error("champ_fws", path)
    assert [s.id for s in res.samples] == ["a"]
    assert res.skipped[0]["id"] == "b" and "out of range" in res.skipped[0]["reason"]


def test_every_format_is_documented():
    import actprm_ray.eval.first_error as fe

    for name in FORMATS:
        assert f"| {name}" in fe.__doc__
