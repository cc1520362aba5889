"""Tests for the synthetic step-labelled pool (actprm_ray/data/synthetic.py).

The oracle here is independent of the generator: equations are parsed from the step text with a regex and
checked with an explicit operator table on exact Fractions (never eval), and "what the correct step would
have been" comes from the correct twin pool (same seed, correct_share=1.0), whose own correctness is
checked by the same oracle.
"""

from __future__ import annotations

import json
import operator
import re
from collections import Counter
from dataclasses import replace
from fractions import Fraction

import pytest

from actprm_ray.data.step_format import DEFAULT_SEP, canonicalize
from actprm_ray.data.synthetic import (
    ERROR_TYPES,
    SyntheticMix,
    _apply,
    _fmt,
    _Generator,
    _whole,
    generate_pool,
    iter_pool,
    write_pool,
)

NUM = r"-?\d+(?:\.\d+)?"
EQUATION = re.compile(rf"({NUM}) ([-+*/]) ({NUM}) = ({NUM})")
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
HALF_CENT = Fraction(1, 200)  # a "/" that does not divide evenly is shown rounded to cents


def equation(step: str) -> tuple[Fraction, str, Fraction, Fraction]:
    found = EQUATION.findall(step)
    assert len(found) == 1, f"expected exactly one equation in {step!r}, found {found}"
    a, op, b, c = found[0]
    return Fraction(a), op, Fraction(b), Fraction(c)


def holds(eq: tuple[Fraction, str, Fraction, Fraction]) -> bool:
    a, op, b, c = eq
    return abs(OPS[op](a, b) - c) <= HALF_CENT


def answer(last_step: str) -> Fraction:
    found = re.search(rf" The answer is ({NUM})\.$", last_step)
    assert found, last_step
    return Fraction(found.group(1))


def question_numbers(question: str) -> list[Fraction]:
    return [Fraction(x) for x in re.findall(r"\d+", question)]


N = 5000
SEED = 11


@pytest.fixture(scope="module")
def pool() -> list[dict]:
    return generate_pool(N, seed=SEED)


@pytest.fixture(scope="module")
def twin() -> list[dict]:
    # Same seed and problem fields, no errors: the correct version of every row of `pool`.
    return generate_pool(N, seed=SEED, mix=SyntheticMix(correct_share=1.0))


# --- hand-worked arithmetic helpers ----------------------------------------------------------------------
def test_apply_rounds_uneven_division_to_cents_and_keeps_ints_exact():
    assert _apply(48, "/", 4) == 12 and type(_apply(48, "/", 4)) is int
    assert _apply(47, "/", 4) == Fraction(1175, 100)  # 11.75
    assert _apply(59, "/", 6) == Fraction(983, 100)  # 9.8333 -> 9.83
    assert _apply(Fraction(983, 100), "-", 25) == Fraction(-1517, 100)
    assert _apply(Fraction(3, 2), "*", 2) == 3 and type(_apply(Fraction(3, 2), "*", 2)) is int


def test_fmt_shows_cents_without_trailing_zeros():
    assert _fmt(29) == 29
    assert _fmt(Fraction(1175, 100)) == "11.75"
    assert _fmt(Fraction(-3, 2)) == "-1.5"
    assert _fmt(Fraction(-1517, 100)) == "-15.17"
    assert _fmt(Fraction(109)) == 109


def test_whole_rejects_negative_and_fractional_results():
    assert _whole(29, "-", 9) == 20
    assert _whole(7, "-", 9) is None
    assert _whole(12, "/", 5) is None
    assert _whole(12, "/", 4) == 3


# --- each mistake on a hand-built problem: 24 + 5 = 29, 29 - 9 = 20, 20 * 3 = 60 ---------------------------
EQS = [(24, "+", 5, 29), (29, "-", 9, 20), (20, "*", 3, 60)]
NUMBERS = [24, 5, 9, 3]


@pytest.fixture
def gen() -> _Generator:
    return _Generator(0, SyntheticMix())


def test_mistake_digit_transposition(gen):
    assert gen._mistake("digit_transposition", 0, EQS, NUMBERS) == (24, "+", 5, 92)
    # 20 and 60 only swap into a leading zero ("02", "06"), which would give the error away
    assert gen._mistake("digit_transposition", 1, EQS, NUMBERS) is None
    assert gen._mistake("digit_transposition", 2, EQS, NUMBERS) is None
    assert gen._mistake("digit_transposition", 0, [(100, "+", 10, 110)], [100, 10]) == (100, "+", 10, 101)
    assert gen._mistake("digit_transposition", 0, [(90, "+", 10, 100)], [90, 10]) is None


def test_mistake_skipped_step_builds_on_the_value_before_the_previous_step(gen):
    assert gen._mistake("skipped_step", 0, EQS, NUMBERS) is None
    assert gen._mistake("skipped_step", 1, EQS, NUMBERS) == (24, "-", 9, 15)
    assert gen._mistake("skipped_step", 2, EQS, NUMBERS) == (29, "*", 3, 87)


def test_mistake_wrong_operator_keeps_operands_and_computes_right(gen):
    # 29 - 9: "+" -> 38, "*" -> 261, "/" does not divide
    for _ in range(20):
        assert gen._mistake("wrong_operator", 1, EQS, NUMBERS) in {(29, "+", 9, 38), (29, "*", 9, 261)}


def test_mistake_wrong_number_copies_another_question_number(gen):
    # 20 * 3 with b taken from {24, 5, 9}
    seen = {gen._mistake("wrong_number", 2, EQS, NUMBERS) for _ in range(50)}
    assert seen == {(20, "*", 24, 480), (20, "*", 5, 100), (20, "*", 9, 180)}


def test_mistake_slips_change_only_the_result(gen):
    for _ in range(50):
        a, op, b, c = gen._mistake("arithmetic_slip", 0, EQS, NUMBERS)
        assert (a, op, b) == (24, "+", 5) and 1 <= abs(c - 29) <= 3
        a, op, b, c = gen._mistake("off_by_ten", 0, EQS, NUMBERS)
        assert (a, op, b) == (24, "+", 5) and c in (19, 39)


# --- pool-level properties -------------------------------------------------------------------------------
def test_same_seed_same_rows_other_seed_other_rows():
    assert generate_pool(300, seed=7) == generate_pool(300, seed=7)
    assert generate_pool(300, seed=7) != generate_pool(300, seed=8)


def test_iter_pool_chunks_concatenate_to_generate_pool():
    chunks = list(iter_pool(103, seed=3, chunk=10))
    assert [len(c) for c in chunks] == [10] * 10 + [3]
    assert [r for c in chunks for r in c] == generate_pool(103, seed=3)
    assert generate_pool(0) == []


def test_row_schema_and_unique_ids(pool):
    assert len({r["id"] for r in pool}) == N
    assert pool[0]["id"] == f"syn-{SEED}-0" and pool[-1]["id"] == f"syn-{SEED}-{N - 1}"
    for r in pool:
        assert set(r) == {"id", "question", "steps", "first_error_step", "source", "error_type"}
        assert r["source"] == "synthetic"
        assert isinstance(r["question"], str) and isinstance(r["first_error_step"], int)
        assert 3 <= len(r["steps"]) <= 8 and all(isinstance(s, str) and s for s in r["steps"])


def test_first_error_step_consistent_with_error_type(pool):
    for r in pool:
        k, kind = r["first_error_step"], r["error_type"]
        if kind == "none":
            assert k == -1
        else:
            assert kind in ERROR_TYPES and 0 <= k < len(r["steps"])
        if kind == "skipped_step":
            assert k >= 1


def test_text_is_already_canonical(pool):
    for r in pool:
        for s in r["steps"] + [r["question"]]:
            assert "\n" not in s and DEFAULT_SEP not in s
        row = canonicalize(r["question"], r["steps"], DEFAULT_SEP)
        assert row.steps == r["steps"] and row.question == r["question"] and row.sep_removed == 0


def test_text_stays_short(pool):
    lengths = sorted(len(r["question"]) + sum(map(len, r["steps"])) for r in pool)
    assert lengths[int(0.99 * N)] <= 600 and lengths[-1] <= 650


def test_correct_rows_are_right_chained_and_use_the_question_numbers(twin):
    for r in twin:
        eqs = [equation(s) for s in r["steps"]]
        assert all(holds(e) for e in eqs), r
        for prev, cur in zip(eqs, eqs[1:]):
            assert cur[0] == prev[3], r  # each step starts from the previous result
        # the question states exactly the operands, in order: a_0, b_0, b_1, ...
        assert question_numbers(r["question"]) == [eqs[0][0]] + [e[2] for e in eqs], r
        assert answer(r["steps"][-1]) == eqs[-1][3]
        assert all(e[3] == int(e[3]) and 1 <= e[3] <= 500 for e in eqs)  # whole, within max_value


def test_twin_keeps_questions_and_correct_rows(pool, twin):
    for r, t in zip(pool, twin):
        assert r["question"] == t["question"]
        if r["error_type"] == "none":
            assert r["steps"] == t["steps"]


def test_error_rows_wrong_at_first_error_step_and_right_before(pool, twin):
    n_error = 0
    for r, t in zip(pool, twin):
        k = r["first_error_step"]
        if k < 0:
            continue
        n_error += 1
        assert r["steps"][:k] == t["steps"][:k]
        eqs, ref = [equation(s) for s in r["steps"]], [equation(s) for s in t["steps"]]
        assert all(holds(e) for e in eqs[:k])
        assert eqs[k][3] != ref[k][3], r  # step k shows a value the correct solution does not reach
        assert eqs[k][3] == int(eqs[k][3]) and eqs[k][3] >= 0
        a, op, b, c = eqs[k]
        ra, rop, rb, rc = ref[k]
        kind = r["error_type"]
        if kind == "arithmetic_slip":
            assert (a, op, b) == (ra, rop, rb) and 1 <= abs(c - rc) <= 3 and not holds(eqs[k])
        elif kind == "off_by_ten":
            assert (a, op, b) == (ra, rop, rb) and abs(c - rc) == 10 and not holds(eqs[k])
        elif kind == "digit_transposition":
            assert (a, op, b) == (ra, rop, rb) and sorted(str(c)) == sorted(str(rc)) and not holds(eqs[k])
        elif kind == "wrong_operator":
            assert (a, b) == (ra, rb) and op != rop and holds(eqs[k])
        elif kind == "wrong_number":
            assert (a, op) == (ra, rop) and b != rb and b in question_numbers(r["question"])
            assert holds(eqs[k])
        elif kind == "skipped_step":
            assert (op, b) == (rop, rb) and a == ref[k - 1][0] and holds(eqs[k])
    assert n_error > 0.4 * N


def test_errors_propagate_through_later_steps(pool, twin):
    n_checked = 0
    for r, t in zip(pool, twin):
        k = r["first_error_step"]
        if k < 0 or k == len(r["steps"]) - 1:
            continue
        eqs, ref = [equation(s) for s in r["steps"]], [equation(s) for s in t["steps"]]
        # the next step builds on the wrong value, not on the correct one
        assert eqs[k + 1][0] == eqs[k][3] != ref[k][3], r
        for j in range(k + 1, len(eqs)):
            assert holds(eqs[j]), r  # locally fine
            assert eqs[j][0] == eqs[j - 1][3]
            assert (eqs[j][1], eqs[j][2]) == (ref[j][1], ref[j][2])  # same events of the question
        assert answer(r["steps"][-1]) == eqs[-1][3]  # the final answer is the propagated wrong value
        n_checked += 1
    assert n_checked > 0.3 * N


def test_default_mix_proportions(pool):
    counts = Counter(r["error_type"] for r in pool)
    assert abs(counts["none"] / N - 0.45) < 0.03
    for kind in ERROR_TYPES:  # 0.55 / 6 each; fallbacks to arithmetic_slip are rare
        assert abs(counts[kind] / N - 0.55 / 6) < 0.025, (kind, counts)


def test_custom_mix_proportions_and_step_counts():
    mix = SyntheticMix(correct_share=0.2, error_weights={"arithmetic_slip": 3.0, "wrong_number": 1.0},
                       min_steps=4, max_steps=5)
    rows = generate_pool(N, seed=2, mix=mix)
    counts = Counter(r["error_type"] for r in rows)
    assert set(counts) == {"none", "arithmetic_slip", "wrong_number"}
    assert abs(counts["none"] / N - 0.2) < 0.03
    assert abs(counts["arithmetic_slip"] / N - 0.6) < 0.03
    assert abs(counts["wrong_number"] / N - 0.2) < 0.03
    steps = Counter(len(r["steps"]) for r in rows)
    assert set(steps) == {4, 5} and abs(steps[4] / N - 0.5) < 0.03


@pytest.mark.parametrize("kind", ERROR_TYPES)
def test_single_type_mix_is_mostly_that_type(kind):
    rows = generate_pool(1000, seed=4, mix=SyntheticMix(correct_share=0.0, error_weights={kind: 1.0}))
    counts = Counter(r["error_type"] for r in rows)
    assert counts[kind] >= 950 and set(counts) <= {kind, "arithmetic_slip"}


def test_number_ranges_are_honoured():
    mix = SyntheticMix(correct_share=1.0, boxes_share=0.0, start_range=(100, 100), op_weights={"+": 1.0},
                       add_range=(7, 7), min_steps=3, max_steps=3)
    for r in generate_pool(50, seed=0, mix=mix):
        assert question_numbers(r["question"]) == [100, 7, 7, 7]
        assert [equation(s)[3] for s in r["steps"]] == [107, 114, 121]


def test_invalid_mix_reports_every_problem():
    with pytest.raises(ValueError) as info:
        generate_pool(1, mix=SyntheticMix(correct_share=1.5, mul_range=(1, 3), error_weights={"typo": 1.0}))
    msg = str(info.value)
    assert "correct_share" in msg and "mul_range" in msg and "typo" in msg


def test_changing_only_error_fields_keeps_problems():
    a = generate_pool(200, seed=5, mix=SyntheticMix(correct_share=0.9, slip_max=1))
    b = generate_pool(200, seed=5, mix=replace(SyntheticMix(), error_weights={"skipped_step": 1.0}))
    assert [r["question"] for r in a] == [r["question"] for r in b]


# --- writing ---------------------------------------------------------------------------------------------
def test_parquet_round_trip(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    rows = generate_pool(500, seed=1)
    path = tmp_path / "sub" / "pool.parquet"
    assert write_pool(rows, path, batch_rows=64) == 500  # several row groups
    table = pq.read_table(path)
    assert str(table.schema.field("first_error_step").type) == "int64"
    assert table.to_pylist() == rows


def test_jsonl_round_trip_from_a_stream(tmp_path):
    path = tmp_path / "pool.jsonl"
    stream = (r for chunk in iter_pool(300, seed=2, chunk=50) for r in chunk)
    assert write_pool(stream, path) == 300
    with open(path, encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == generate_pool(300, seed=2)


def test_write_pool_rejects_unknown_suffix_and_writes_empty_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    with pytest.raises(ValueError):
        write_pool([], tmp_path / "pool.csv")
    assert write_pool([], tmp_path / "empty.parquet") == 0
    table = pq.read_table(tmp_path / "empty.parquet")
    assert table.num_rows == 0 and "steps" in table.schema.names


@pytest.mark.extended  # CI budget
def test_million_rows_stream_to_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "big.parquet"
    stream = (r for chunk in iter_pool(1_000_000, seed=9, chunk=20_000) for r in chunk)
    assert write_pool(stream, path) == 1_000_000
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 1_000_000
    last = pq.ParquetFile(path).read_row_group(meta.num_row_groups - 1).to_pylist()[-1]
    assert last["id"] == "syn-9-999999"
