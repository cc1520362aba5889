"""A corpus of bad input rows, one per kind, among good ones; written fresh by the tests (no binary data in git).

    write_pool_corpus(dir) -> {row id: kind}           pool.jsonl + Parquet shards: loop, filter, label job,
                                                       supervised training (jobs/train.py)
    write_processbench_corpus(dir) -> {row id: kind}   a ProcessBench folder (four subsets): jobs/evaluate.py

POOL_KINDS / PROCESSBENCH_KINDS give each kind's expected verdict: a regex the reason must match, or one of
the markers below for rows the documented behaviour accepts (a separator inside a step is removed, not
rejected; NaN in first_error_step is a missing label, as pandas writes one).

Row ids are the ones the jobs assign: a row that cannot keep its own id (unreadable, no usable id, a repeated
id) is named by its locator `<file>#<row>` (0-based line for JSONL).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from actprm_ray.data.step_format import DEFAULT_SEP
from actprm_ray.data.synthetic import generate_pool, write_pool

VALID = "valid"  # accepted as is (the label, if any, is the row's own)
NO_LABEL = "valid, no label"  # accepted; the row has no first_error_step (the oracle cannot label it)
TOO_LONG = "too long"  # invalid where a tokenizer cuts at model.max_length (loop, filter); accepted by the label job
SELECTED_BAD = "selected not a bool"  # only the label job reads `selected`; the other jobs ignore the column
LABEL_COLUMN = "a label column"  # only supervised training reads hard_labels & co (TRAIN_LABEL_KINDS)

MAX_LENGTH = 512  # model.max_length the tests run with
DUPLICATED_ID = "dup-1"
HUGE_STEP = "7 + 8 = 15. " * 87_000  # ~1 MB
_BASE = {"question": "Tom has 3 apples. He buys 2 more. How many apples does he have?",
         "steps": ["He buys 2 more: 3 + 2 = 5.", "The answer is 5."], "first_error_step": -1}

POOL_KINDS = {
    # the reader: the line itself, the id, the required fields
    "truncated_line": r"^bad JSON on line \d+: ",
    "raw_nul_byte": r"^bad JSON on line \d+: Invalid control character",
    "non_utf8": r"^line \d+ is not valid UTF-8 \(invalid continuation byte",
    "json_array": r"^row is a JSON array, not an object$",
    "json_number": r"^row is a JSON number, not an object$",
    "json_string": r"^row is a JSON string, not an object$",
    "json_null": r"^row is a JSON null, not an object$",
    "missing_id": r"^missing id$",
    "missing_question": r"^missing question$",
    "missing_steps": r"^missing steps$",
    "missing_all": r"^missing id$",  # {} : the id is what the row is named by, so it is named first
    "null_id": r"^id is null$",
    "blank_id": r"^id is empty$",
    "list_id": r"^id must be a string or an integer, got list$",
    "float_id": r"^id must be a string or an integer, got float$",
    "duplicate_id": rf"^duplicate id '{DUPLICATED_ID}' \(first at pool\.jsonl#\d+\)$",
    "duplicate_first": VALID,
    "int_id": VALID,
    "extra_fields": VALID,
    # types and empty values (CanonicalizeStage / step_format.canonicalize)
    "null_question": r"^question must be a string, got NoneType$",
    "list_question": r"^question must be a string, got list$",
    "empty_question": r"^question is empty after normalisation$",
    "separator_only_question": r"^question is empty after normalisation$",
    "null_steps": r"^steps must be a list of strings, got NoneType$",
    "string_steps": r"^steps must be a list of strings, got str$",
    "int_steps": r"^steps must be a list of strings, got int$",
    "dict_steps": r"^steps must be a list of strings, got dict$",
    "empty_steps": r"^steps is empty$",
    "empty_string_step": r"^step 1 is empty after normalisation$",
    "whitespace_step": r"^step 1 is empty after normalisation$",
    "separator_only_step": r"^step 0 is empty after normalisation$",
    "null_step": r"^step 1 must be a string, got NoneType$",
    "int_step": r"^step 0 must be a string, got int$",
    "nested_step": r"^step 0 must be a string, got list$",
    "separator_in_step": VALID,  # removed (sep_removed counts it), never read out
    "separator_in_question": VALID,
    "nul_in_step": r"^step 0 contains a NUL character$",
    "nul_in_question": r"^question contains a NUL character$",
    "lone_surrogate": r"^step 1 is not valid Unicode \(unpaired surrogate at character 1\)$",
    # first_error_step
    "fes_too_large": r"^first_error_step 7 out of range for 2 steps \(-1\.\.1\)$",
    "fes_below_minus_one": r"^first_error_step -5 out of range for 2 steps",
    "fes_string": r"^first_error_step must be an integer, got str '1'$",
    "fes_bool": r"^first_error_step must be an integer, got bool True$",
    "fes_fraction": r"^first_error_step must be an integer, got float 0\.5$",
    "fes_infinity": r"^first_error_step must be an integer, got float inf$",
    "fes_list": r"^first_error_step must be an integer, got list \[0\]$",
    "fes_nan": NO_LABEL,
    "fes_null": NO_LABEL,
    # length (model.max_length = MAX_LENGTH)
    "huge_step": TOO_LONG,  # a 1 MB step: its separator is far past the cut
    "long_question": TOO_LONG,  # the prompt alone is longer than max_length
    "long_tail": VALID,  # first steps fit: cut, and the first error (past the cut) becomes -1
    # the label job's own column
    "selected_string": SELECTED_BAD,
    # the label columns (data/shards.py LABEL_COLUMNS)
    "hard_labels_given": VALID,  # supervised training trains on them, the other jobs on first_error_step
    "judge_tokens_whole_float": VALID,
    "hard_labels_string": LABEL_COLUMN,
    "hard_labels_null_item": LABEL_COLUMN,
    "hard_labels_fraction": LABEL_COLUMN,
    "hard_labels_bool": LABEL_COLUMN,
    "label_key_int": LABEL_COLUMN,
    "judge_tokens_string": LABEL_COLUMN,
    "hard_labels_not_binary": LABEL_COLUMN,
    "hard_labels_after_error": LABEL_COLUMN,
    "hard_labels_too_many": LABEL_COLUMN,
    # Parquet shards
    "parquet_wrong_schema": r"^missing id$",
    "parquet_string_steps": r"^steps must be a list of strings, got str$",
    "parquet_binary_question": r"^question must be a string, got bytes$",
    "parquet_null_steps": r"^steps must be a list of strings, got NoneType$",
    "parquet_fes_whole_float": VALID,  # 1.0 in a float column (pandas writes ints with nulls that way)
    "parquet_fes_nan": NO_LABEL,
    "parquet_fes_fraction": r"^first_error_step must be an integer, got float 2\.5$",
}

# Supervised training's verdict on the LABEL_COLUMN kinds: (outcome, reason regex). The reader rejects a wrong type
# (invalid_input), attach_labels a list that is no METHOD §1 labelling (label_failed).
TRAIN_LABEL_KINDS = {
    "hard_labels_string": ("invalid_input", r"^hard_labels must be a list of integers, got str$"),
    "hard_labels_null_item": ("invalid_input", r"^hard_labels\[1\] must be an integer, got NoneType None$"),
    "hard_labels_fraction": ("invalid_input", r"^hard_labels\[1\] must be an integer, got float 0\.5$"),
    "hard_labels_bool": ("invalid_input", r"^hard_labels\[0\] must be an integer, got bool True$"),
    "label_key_int": ("invalid_input", r"^label_key must be a string, got int$"),
    "judge_tokens_string": ("invalid_input", r"^judge_tokens must be an integer, got str 'many'$"),
    "hard_labels_not_binary": ("label_failed", r"^hard_labels must be 0/1, got \[2\]$"),
    "hard_labels_after_error": ("label_failed", r"^hard_labels continue after the first error"),
    "hard_labels_too_many": ("label_failed", r"^3 hard_labels for 2 steps$"),
}


def _row(rid, **over) -> dict:
    return {"id": rid, **_BASE, **over}


def _without(key: str, rid="x") -> dict:
    row = _row(rid)
    del row[key]
    return row


def _line(obj) -> bytes:
    return json.dumps(obj).encode()


def _jsonl_entries() -> list[tuple[str, str | None, bytes]]:
    """(kind, id, line) in file order; id None = the row is named by its locator."""
    long_steps = [f"Step {i}: 3 + 2 = 5, and 5 + 0 = 5, so the count stays at 5 apples." for i in range(40)]
    return [
        ("duplicate_first", DUPLICATED_ID, _line(_row(DUPLICATED_ID))),
        ("truncated_line", None, b'{"id": "cut", "question": "q", "steps": ["a"'),
        ("raw_nul_byte", None, b'{"id": "raw-nul", "question": "a\x00b", "steps": ["a"]}'),
        ("non_utf8", None, b'{"id": "latin1", "question": "caf\xe9 au lait", "steps": ["a"]}'),
        ("json_array", None, b'["id", "question", "steps"]'),
        ("json_number", None, b"42"),
        ("json_string", None, b'"just a string"'),
        ("json_null", None, b"null"),
        ("missing_id", None, _line(_without("id"))),
        ("missing_question", "no-question", _line(_without("question", "no-question"))),
        ("missing_steps", "no-steps", _line(_without("steps", "no-steps"))),
        ("missing_all", None, b"{}"),
        ("null_id", None, _line(_row(None))),
        ("blank_id", None, _line(_row("   "))),
        ("list_id", None, _line(_row(["a", "b"]))),
        ("float_id", None, _line(_row(1.5))),
        ("duplicate_id", None, _line(_row(DUPLICATED_ID, question="A different row with the same id?"))),
        ("int_id", "12345", _line(_row(12345))),
        ("extra_fields", "extra", _line(_row("extra", source="gsm8k", score=0.3, meta={"a": [1, 2]}))),
        ("null_question", "null-question", _line(_row("null-question", question=None))),
        ("list_question", "list-question", _line(_row("list-question", question=["What", "is", "2+2?"]))),
        ("empty_question", "empty-question", _line(_row("empty-question", question=" \n\n "))),
        ("separator_only_question", "sep-question", _line(_row("sep-question", question=f" {DEFAULT_SEP} "))),
        ("null_steps", "null-steps", _line(_row("null-steps", steps=None))),
        ("string_steps", "string-steps", _line(_row("string-steps", steps="3 + 2 = 5. The answer is 5."))),
        ("int_steps", "int-steps", _line(_row("int-steps", steps=5))),
        ("dict_steps", "dict-steps", _line(_row("dict-steps", steps={"0": "3 + 2 = 5.", "1": "So 5."}))),
        ("empty_steps", "empty-steps", _line(_row("empty-steps", steps=[]))),
        ("empty_string_step", "empty-step", _line(_row("empty-step", steps=["3 + 2 = 5.", ""]))),
        ("whitespace_step", "blank-step", _line(_row("blank-step", steps=["3 + 2 = 5.", " \t\n\n  "]))),
        ("separator_only_step", "sep-step", _line(_row("sep-step", steps=[f" {DEFAULT_SEP} ", "So 5."]))),
        ("null_step", "null-step", _line(_row("null-step", steps=["3 + 2 = 5.", None]))),
        ("int_step", "int-step", _line(_row("int-step", steps=[5, "So 5."]))),
        ("nested_step", "nested-step", _line(_row("nested-step", steps=[["3 + 2 = 5."], "So 5."]))),
        ("separator_in_step", "sep-in-step", _line(_row("sep-in-step", steps=[f"3 + 2 {DEFAULT_SEP}= 5.", "So 5."]))),
        ("separator_in_question", "sep-in-question",
         _line(_row("sep-in-question", question=f"How many {DEFAULT_SEP}apples?"))),
        ("nul_in_step", "nul-step", _line(_row("nul-step", steps=["3 + 2\u0000 = 5.", "So 5."]))),
        ("nul_in_question", "nul-question", _line(_row("nul-question", question="How many\u0000 apples?"))),
        ("lone_surrogate", "surrogate", b'{"id": "surrogate", "question": "q?", "steps": ["3 + 2 = 5.", "a\\ud800b"]}'),
        ("fes_too_large", "fes-large", _line(_row("fes-large", first_error_step=7))),
        ("fes_below_minus_one", "fes-below", _line(_row("fes-below", first_error_step=-5))),
        ("fes_string", "fes-string", _line(_row("fes-string", first_error_step="1"))),
        ("fes_bool", "fes-bool", _line(_row("fes-bool", first_error_step=True))),
        ("fes_fraction", "fes-fraction", _line(_row("fes-fraction", first_error_step=0.5))),
        ("fes_infinity", "fes-inf", _line(_row("fes-inf", first_error_step=float("inf")))),
        ("fes_list", "fes-list", _line(_row("fes-list", first_error_step=[0]))),
        ("fes_nan", "fes-nan", _line(_row("fes-nan", first_error_step=float("nan")))),
        ("fes_null", "fes-null", _line(_row("fes-null", first_error_step=None))),
        ("huge_step", "huge-step", _line(_row("huge-step", steps=[HUGE_STEP, "So 15."]))),
        ("long_question", "long-question", _line(_row("long-question", question="Tom has 3 apples. " * 400))),
        ("long_tail", "long-tail", _line(_row("long-tail", steps=long_steps, first_error_step=30))),
        ("selected_string", "selected-string", _line(_row("selected-string", selected="yes"))),
        ("hard_labels_given", "hl-given",
         _line(_row("hl-given", hard_labels=[1, 0], first_error_step=1, label_source="judge:x"))),
        ("judge_tokens_whole_float", "jt-float", _line(_row("jt-float", hard_labels=[1, 1], judge_tokens=120.0))),
        ("hard_labels_string", "hl-string", _line(_row("hl-string", hard_labels="10"))),
        ("hard_labels_null_item", "hl-null-item", _line(_row("hl-null-item", hard_labels=[1, None]))),
        ("hard_labels_fraction", "hl-fraction", _line(_row("hl-fraction", hard_labels=[1, 0.5]))),
        ("hard_labels_bool", "hl-bool", _line(_row("hl-bool", hard_labels=[True, False]))),
        ("label_key_int", "lk-int", _line(_row("lk-int", hard_labels=[1, 1], label_key=7))),
        ("judge_tokens_string", "jt-string", _line(_row("jt-string", hard_labels=[1, 1], judge_tokens="many"))),
        ("hard_labels_not_binary", "hl-two", _line(_row("hl-two", hard_labels=[1, 2]))),
        ("hard_labels_after_error", "hl-after", _line(_row("hl-after", hard_labels=[0, 1]))),
        ("hard_labels_too_many", "hl-many", _line(_row("hl-many", hard_labels=[1, 1, 1]))),
    ]


def _parquet_shards() -> dict[str, tuple[pa.Table, list[tuple[str, str | None]]]]:
    """file name -> (table, [(kind, id or None)] per row)."""
    return {
        "wrong_schema.parquet": (pa.table({"uid": ["w0", "w1"], "text": ["a", "b"]}),
                                 [("parquet_wrong_schema", None), ("parquet_wrong_schema", None)]),
        "string_steps.parquet": (pa.table({"id": ["pq-string-steps"], "question": ["q?"], "steps": ["3 + 2 = 5."]}),
                                 [("parquet_string_steps", "pq-string-steps")]),
        "binary_question.parquet": (
            pa.table({"id": ["pq-binary"], "question": pa.array([b"caf\xe9?"], pa.binary()), "steps": [["a"]]}),
            [("parquet_binary_question", "pq-binary")]),
        "float_labels.parquet": (
            pa.table({"id": ["pq-whole", "pq-nan", "pq-fraction", "pq-null-steps"],
                      "question": [_BASE["question"]] * 4,
                      "steps": pa.array([_BASE["steps"], _BASE["steps"], _BASE["steps"], None], pa.list_(pa.string())),
                      "first_error_step": pa.array([1.0, float("nan"), 2.5, 0.0], pa.float64())}),
            [("parquet_fes_whole_float", "pq-whole"), ("parquet_fes_nan", "pq-nan"),
             ("parquet_fes_fraction", "pq-fraction"), ("parquet_null_steps", "pq-null-steps")]),
    }


def write_pool_corpus(directory: str | Path, *, good_rows: int = 8) -> dict[str, str]:
    """Write the corpus (good rows included, kind "good") into `directory`; return {row id: kind}."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    kinds: dict[str, str] = {}
    lines = []
    for kind, rid, line in _jsonl_entries():
        kinds[rid if rid is not None else f"pool.jsonl#{len(lines)}"] = kind
        lines.append(line)
    for row in generate_pool(good_rows, seed=11):
        kinds[row["id"]] = "good"
        lines.append(_line(row))
    (d / "pool.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    for name, (table, rows) in _parquet_shards().items():
        pq.write_table(table, d / name)
        for j, (kind, rid) in enumerate(rows):
            kinds[rid if rid is not None else f"{name}#{j}"] = kind
    good = generate_pool(good_rows, seed=12)
    write_pool(good, d / "good.parquet")
    kinds.update({row["id"]: "good" for row in good})
    assert set(kinds.values()) == set(POOL_KINDS) | {"good"}, set(POOL_KINDS) ^ (set(kinds.values()) - {"good"})
    return kinds


# -- ProcessBench format (jobs/evaluate.py) ------------------------------------------------------------------------
SKIPPED, UNSCORABLE, SCORED = "skipped", "unscorable", "scored"  # where a ProcessBench row ends

# kind -> (where it ends, regex for the reason); the loader skips bad values, the scorer reports rows it cannot read.
PROCESSBENCH_KINDS = {
    "truncated_line": (SKIPPED, r"^invalid JSON: "),
    "non_utf8": (SKIPPED, r"^not valid UTF-8 \(invalid continuation byte"),
    "json_array": (SKIPPED, r"^row is a list, not an object$"),
    "label_too_large": (SKIPPED, r"^label 5 out of range for 2 steps$"),
    "label_below_minus_one": (SKIPPED, r"^label -3 out of range for 2 steps$"),
    "label_string": (SKIPPED, r"^label must be an int, got str '1'$"),
    "label_nan": (SKIPPED, r"^label must be an int, got float nan$"),
    "label_bool": (SKIPPED, r"^label must be an int, got bool True$"),
    "label_null": (SKIPPED, r"^label must be an int, got NoneType None$"),
    "steps_string": (SKIPPED, r"^steps must be a non-empty list, got str$"),
    "steps_empty": (SKIPPED, r"^steps is empty$"),
    "step_not_string": (SKIPPED, r"^step\(s\) \[1\] are not strings$"),
    "duplicate_id": (SKIPPED, r"^duplicate id \(first at gsm8k\.jsonl:1\)$"),
    "empty_string_step": (UNSCORABLE, r"^step 1 is empty after normalisation$"),
    "whitespace_step": (UNSCORABLE, r"^step 0 is empty after normalisation$"),
    "separator_only_step": (UNSCORABLE, r"^step 0 is empty after normalisation$"),
    "nul_in_step": (UNSCORABLE, r"^step 0 contains a NUL character$"),
    "lone_surrogate": (UNSCORABLE, r"^step 1 is not valid Unicode"),
    "problem_list": (UNSCORABLE, r"^question must be a string, got list$"),
    "problem_empty": (UNSCORABLE, r"^question is empty after normalisation$"),
    "huge_step": (UNSCORABLE, r"^\d+ tokens exceed max_tokens=32768$"),
    "separator_in_step": (SCORED, ""),
    "extra_fields": (SCORED, ""),
    "int_id": (SCORED, ""),
}


def _pb(rid, steps=("3 + 2 = 5.", "The answer is 5."), label=-1, problem="Tom has 3 apples and buys 2. How many?",
        **extra) -> dict:
    return {"id": rid, "generator": "test", "problem": problem, "steps": list(steps) if isinstance(steps, tuple)
            else steps, "final_answer_correct": label == -1, "label": label, **extra}


def write_processbench_corpus(directory: str | Path) -> dict[str, str]:
    """gsm8k.jsonl with every bad kind among good rows, and three small good subsets; return {id or
    "gsm8k.jsonl:<line>" for rows without a readable id: kind} (good rows: kind "good")."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    entries = [
        ("good", "gsm8k-0", _line(_pb("gsm8k-0"))),  # line 1: the first holder of the duplicated id
        ("truncated_line", None, b'{"id": "gsm8k-cut", "problem": "p", "steps": ["a"'),
        ("non_utf8", None, b'{"id": "gsm8k-latin1", "problem": "caf\xe9", "steps": ["a"], "label": -1}'),
        ("json_array", None, b'["gsm8k-x"]'),
        ("label_too_large", "gsm8k-l5", _line(_pb("gsm8k-l5", label=5))),
        ("label_below_minus_one", "gsm8k-lm3", _line(_pb("gsm8k-lm3", label=-3))),
        ("label_string", "gsm8k-lstr", _line(_pb("gsm8k-lstr", label="1"))),
        ("label_nan", "gsm8k-lnan", _line(_pb("gsm8k-lnan", label=float("nan")))),
        ("label_bool", "gsm8k-lbool", _line(_pb("gsm8k-lbool", label=True))),
        ("label_null", "gsm8k-lnull", _line(_pb("gsm8k-lnull", label=None))),
        ("steps_string", "gsm8k-sstr", _line(_pb("gsm8k-sstr", steps="3 + 2 = 5."))),
        ("steps_empty", "gsm8k-sempty", _line(_pb("gsm8k-sempty", steps=[]))),
        ("step_not_string", "gsm8k-sint", _line(_pb("gsm8k-sint", steps=["a", 5]))),
        ("duplicate_id", None, _line(_pb("gsm8k-0", problem="Another row with a taken id?"))),
        ("empty_string_step", "gsm8k-e", _line(_pb("gsm8k-e", steps=["a", ""]))),
        ("whitespace_step", "gsm8k-w", _line(_pb("gsm8k-w", steps=[" \n\n\t", "b"]))),
        ("separator_only_step", "gsm8k-sep", _line(_pb("gsm8k-sep", steps=[DEFAULT_SEP, "b"]))),
        ("nul_in_step", "gsm8k-nul", _line(_pb("gsm8k-nul", steps=["a\u0000b", "c"]))),
        ("lone_surrogate", "gsm8k-sur", b'{"id": "gsm8k-sur", "problem": "p?", "steps": ["a", "b\\udc00"], "label": -1}'),
        ("problem_list", "gsm8k-plist", _line(_pb("gsm8k-plist", problem=["p", "?"]))),
        ("problem_empty", "gsm8k-pempty", _line(_pb("gsm8k-pempty", problem="   "))),
        ("huge_step", "gsm8k-huge", _line(_pb("gsm8k-huge", steps=[HUGE_STEP, "So 15."], label=0))),
        ("separator_in_step", "gsm8k-sepin", _line(_pb("gsm8k-sepin", steps=[f"3 + 2 {DEFAULT_SEP}= 5.", "So 5."]))),
        ("extra_fields", "gsm8k-extra", _line(_pb("gsm8k-extra", note="extra", tags=["x"]))),
        ("int_id", "777", _line(_pb(777, label=0))),
        ("good", "gsm8k-1", _line(_pb("gsm8k-1", label=1))),
    ]
    kinds = {}
    for line_no, (kind, rid, _) in enumerate(entries, 1):
        kinds[rid if rid is not None else f"gsm8k.jsonl:{line_no}"] = kind
    (d / "gsm8k.jsonl").write_bytes(b"\n".join(e[2] for e in entries) + b"\n")
    for subset in ("math", "olympiadbench", "omnimath"):
        rows = [_pb(f"{subset}-0"), _pb(f"{subset}-1", label=0)]
        (d / f"{subset}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        kinds.update({r["id"]: "good" for r in rows})
    assert set(kinds.values()) == set(PROCESSBENCH_KINDS) | {"good"}
    return kinds
