"""Synthetic step-labelled pool: generated arithmetic word problems with a known first error.

Each row is a short GSM8K-like trajectory. The question tells a story about one running quantity; every step
applies one event of the story and carries exactly one equation "a op b = c":

    question: "Mia has 24 apples. She buys 5 more. She sells 9. How many apples does Mia have now?"
    steps:    ["She buys 5 more: 24 + 5 = 29.",
               "She sells 9, so 29 - 9 = 20 remain. The answer is 20."]

Step 0 applies the first event to the start number (or, for a "boxes" start, multiplies the two numbers of
the first sentence); step i > 0 applies event i to the result of step i - 1. The numbers of the question, in
reading order, are therefore [a_0, b_0, b_1, ..., b_{m-1}].

An error row has one injected mistake at step k = `first_error_step`. Steps before k are correct. Step k is
the only step that is wrong *locally*; every later step computes correctly from the wrong value (so it looks
fine on its own), which is how a real slip propagates. Error types (`error_type`, "none" for correct rows):

    arithmetic_slip      c is off by 1..slip_max            "24 + 5 = 30"
    off_by_ten           c is off by exactly 10 (a carry)   "24 + 5 = 39"
    digit_transposition  two adjacent digits of c swapped   "24 + 5 = 92"
    wrong_operator       another operator, computed right   "24 * 5 = 120" for "buys 5 more"
    wrong_number         another number of the question     "24 + 9 = 33" (9 belongs to the next event)
    skipped_step         (k >= 1) builds on the value from before step k-1, as if step k-1 had not
                         happened: "24 - 9 = 15" as step 1

The first three are arithmetically false at step k; the last three are arithmetically true but do not
follow from the question, which is the subtler kind for a PRM. Step k always shows a whole, non-negative
number; later steps may show decimals (a "/" that no longer divides evenly, rounded to cents) or negatives
when the wrong value forces them. Those steps are never labelled (METHOD §1 drops steps after the first
error), they only keep the trajectory honest.

Determinism: the problems come from one random.Random stream and the error draws from a second one, both
seeded from `seed`. So the same seed gives identical rows, and changing only the error fields of the mix
(correct_share, error_weights, slip_max) keeps every question and every correct step: a pool with
correct_share=1.0 is the exact correct "twin" of any pool with the same seed and problem fields.
"""

from __future__ import annotations

import json
import random
import string
from bisect import bisect_right
from dataclasses import dataclass, field
from fractions import Fraction
from operator import itemgetter
from pathlib import Path
from typing import Iterable, Iterator

__all__ = ["ERROR_TYPES", "OPERATORS", "SyntheticMix", "generate_pool", "iter_pool", "write_pool"]

ERROR_TYPES = (
    "arithmetic_slip",
    "off_by_ten",
    "digit_transposition",
    "wrong_operator",
    "wrong_number",
    "skipped_step",
)
OPERATORS = ("+", "-", "*", "/")


@dataclass
class SyntheticMix:
    """What the pool looks like. Every field has a default; `validate()` reports all problems at once.

    Error fields (changing only these keeps the problems of a seed, see the module docstring):
        correct_share: fraction of rows with no error (first_error_step = -1). Default 0.45.
        error_weights: relative weight of each error type among the error rows (keys from ERROR_TYPES; a
            missing key means weight 0). Default 1.0 for every type. The error step is drawn uniformly
            (from step 1 for skipped_step); when the type cannot occur there, the next step that allows it
            is used, and when no step does (e.g. digit_transposition with only one-digit results) the row
            becomes an arithmetic_slip. At the default ranges that happens to < 3% of a type's rows.
        slip_max: largest absolute error of an arithmetic_slip. Default 3.
    Problem fields:
        min_steps, max_steps: number of steps (= events in the story), drawn uniformly. Default 3..8.
        op_weights: relative weight of each operator for an event. When the drawn operator is impossible
            for the running value (nothing to divide by, the result would pass max_value or drop below 1)
            the event becomes "+" (or "-" when "+" would pass max_value). Default + .35, - .30, * .20, / .15.
        boxes_share: fraction of problems that open with "N boxes with M items in each" (step 0 is then
            N * M) instead of "has N items". Default 0.3.
        start_range: the start number of a plain opening, inclusive. Default (5, 60).
        box_count_range, box_size_range: N and M of a boxes opening. Defaults (2, 6) and (3, 25).
        add_range, sub_range: operands of "+" / "-" events. Defaults (2, 40) and (2, 40).
        mul_range, div_range: operands of "*" / "/" events (>= 2, so every event changes the value).
            Defaults (2, 4) and (2, 6).
        max_value: no correct intermediate value exceeds this. Default 500 (keeps the text short).
    """

    correct_share: float = 0.45
    error_weights: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in ERROR_TYPES})
    slip_max: int = 3
    min_steps: int = 3
    max_steps: int = 8
    op_weights: dict[str, float] = field(default_factory=lambda: {"+": 0.35, "-": 0.30, "*": 0.20, "/": 0.15})
    boxes_share: float = 0.3
    start_range: tuple[int, int] = (5, 60)
    box_count_range: tuple[int, int] = (2, 6)
    box_size_range: tuple[int, int] = (3, 25)
    add_range: tuple[int, int] = (2, 40)
    sub_range: tuple[int, int] = (2, 40)
    mul_range: tuple[int, int] = (2, 4)
    div_range: tuple[int, int] = (2, 6)
    max_value: int = 500

    def validate(self) -> None:
        """Raise ValueError listing every inconsistent field."""
        errs = []
        if not 0.0 <= self.correct_share <= 1.0:
            errs.append(f"correct_share {self.correct_share} not in [0, 1]")
        unknown = set(self.error_weights) - set(ERROR_TYPES)
        if unknown:
            errs.append(f"error_weights has unknown types {sorted(unknown)}; known: {list(ERROR_TYPES)}")
        if any(w < 0 for w in self.error_weights.values()):
            errs.append("error_weights must be >= 0")
        if self.correct_share < 1.0 and sum(self.error_weights.values()) <= 0:
            errs.append("error_weights sum to 0 but correct_share < 1")
        if self.slip_max < 1:
            errs.append(f"slip_max {self.slip_max} < 1")
        if not 2 <= self.min_steps <= self.max_steps:
            errs.append(f"need 2 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        unknown = set(self.op_weights) - set(OPERATORS)
        if unknown:
            errs.append(f"op_weights has unknown operators {sorted(unknown)}")
        if any(w < 0 for w in self.op_weights.values()) or sum(self.op_weights.values()) <= 0:
            errs.append("op_weights must be >= 0 with a positive sum")
        if not 0.0 <= self.boxes_share <= 1.0:
            errs.append(f"boxes_share {self.boxes_share} not in [0, 1]")
        for name, floor in [("start_range", 1), ("box_count_range", 2), ("box_size_range", 1), ("add_range", 1),
                            ("sub_range", 1), ("mul_range", 2), ("div_range", 2)]:
            lo, hi = getattr(self, name)
            if not floor <= lo <= hi:
                errs.append(f"{name} ({lo}, {hi}) needs {floor} <= lo <= hi")
        top = max(self.start_range[1], self.box_count_range[1] * self.box_size_range[1])
        if self.max_value < top + self.add_range[0]:
            errs.append(f"max_value {self.max_value} leaves no room above the largest opening value {top}")
        # A value too large for "+" (above max_value - add lo) must still allow "-", or no event fits.
        if self.sub_range[0] > self.max_value - self.add_range[0]:
            errs.append(f"sub_range lo {self.sub_range[0]} > max_value - add_range lo")
        if errs:
            raise ValueError("invalid SyntheticMix: " + "; ".join(errs))


# --- templates -------------------------------------------------------------------------------------------
# Every step template holds exactly one "{a} {x} {b} = {c}" (x = operator symbol), so an injected wrong
# operator or operand shows up in the sentence as well as in the equation. Question clauses carry exactly one
# number ({b}, or {q} and {b} for the boxes opening) and names/items hold no digits, so the question's numbers
# in reading order are exactly the operands. Short on purpose: 8 steps must fit in ~600 characters.
_PERSONAS = (
    ("Mia", "She", "she"), ("Leo", "He", "he"), ("Ava", "She", "she"),
    ("Sam", "He", "he"), ("Zoe", "She", "she"), ("Ben", "He", "he"),
    ("Ivy", "She", "she"), ("Max", "He", "he"), ("Nora", "She", "she"),
    ("Omar", "He", "he"),
)
_ITEMS = ("apples", "marbles", "stickers", "cookies", "pencils", "cards", "shells", "coins", "stamps", "beads")
_OPEN_PLAIN = "{n} has {b} {i}."
_OPEN_BOXES = ("{n} has {q} boxes with {b} {i} in each.", "{a} boxes of {b} hold {a} {x} {b} = {c} {i}.")
_EVENTS = {  # operator -> (question clause, step sentence) variants
    "+": (
        ("{P} buys {b} more.", "{P} buys {b} more: {a} {x} {b} = {c}."),
        ("{P} gets {b} more.", "With {b} more, {p} has {a} {x} {b} = {c}."),
        ("{P} finds {b} more.", "Finding {b} more gives {a} {x} {b} = {c}."),
    ),
    "-": (
        ("{P} gives away {b}.", "Giving away {b} leaves {a} {x} {b} = {c}."),
        ("{P} loses {b}.", "Losing {b} leaves {a} {x} {b} = {c} {i}."),
        ("{P} sells {b}.", "{P} sells {b}, so {a} {x} {b} = {c} remain."),
    ),
    "*": (
        ("{P} gets {b} times as many.", "{b} times as many is {a} {x} {b} = {c}."),
        ("{P} trades each for {b} new ones.", "Trading each for {b} gives {a} {x} {b} = {c}."),
    ),
    "/": (
        ("{P} keeps one of {b} equal piles.", "One pile has {a} {x} {b} = {c} {i}."),
        ("{P} keeps one of {b} equal bags.", "One of {b} bags holds {a} {x} {b} = {c}."),
    ),
}
_ENDINGS = ("How many {i} does {n} have now?", "How many {i} are left?", "How many {i} does {n} end with?")
_ANSWER = " The answer is %s."
_EQ_FIELDS = ("a", "x", "b", "c")


def _bake_step(tpl: str, who: dict) -> tuple[str, itemgetter]:
    """A step template with persona and item filled in, as (%-format string, getter).

    `fmt % getter((a, x, b, c))` renders the step: positional %-formatting is the hot loop's cheapest format,
    and the getter puts a, x, b, c in the order the template uses them (b may appear twice).
    """
    out, order = [], []
    for literal, name, _, _ in string.Formatter().parse(tpl):
        out.append(literal.replace("%", "%%"))
        if name is None:
            continue
        if name in who:
            out.append(who[name].replace("%", "%%"))
        else:
            out.append("%s")
            order.append(_EQ_FIELDS.index(name))
    return "".join(out), itemgetter(*order)


def _bake(persona: tuple[str, str, str], item: str) -> dict:
    """All templates for one persona and item: question clauses take their numbers positionally ("%s")."""
    n, cap, low = persona
    who = dict(n=n, P=cap, p=low, i=item)
    ask = dict(who, q="%s", b="%s")
    return {
        "open_plain": _OPEN_PLAIN.format(**ask),
        "open_boxes": (_OPEN_BOXES[0].format(**ask), _bake_step(_OPEN_BOXES[1], who)),
        "events": {
            op: tuple((q.format(**ask), _bake_step(s, who)) for q, s in v) for op, v in _EVENTS.items()
        },
        "endings": tuple(e.format(**who) for e in _ENDINGS),
    }


_BAKED = tuple(tuple(_bake(p, it) for it in _ITEMS) for p in _PERSONAS)


# --- arithmetic ------------------------------------------------------------------------------------------
def _apply(a: int | Fraction, op: str, b: int) -> int | Fraction:
    """a op b as a solver writes it: exact, except "/" that does not divide evenly is rounded to cents."""
    if op == "+":
        r = a + b
    elif op == "-":
        r = a - b
    elif op == "*":
        r = a * b
    else:
        if type(a) is int and a % b == 0:
            return a // b
        r = Fraction(round(Fraction(a) / b * 100), 100)
    if type(r) is Fraction and r.denominator == 1:
        return r.numerator
    return r


def _whole(a: int, op: str, b: int) -> int | None:
    """a op b when it is a whole number >= 0 (the only values step k may show), else None."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a >= b else None
    if op == "*":
        return a * b
    return a // b if b and a % b == 0 else None


def _fmt(v: int | Fraction) -> int | str:
    """Display form: ints as they are, cent values as "11.75" / "-1.5"."""
    if type(v) is int or v.denominator == 1:
        return int(v)
    cents = int(v * 100)  # exact: every non-integer value is rounded to cents by _apply
    sign, cents = ("-" if cents < 0 else ""), abs(cents)
    return f"{sign}{cents // 100}.{cents % 100:02d}".rstrip("0")


def _cumulative(weights: dict, keys: tuple) -> tuple[list[str], list[float]]:
    """Keys with positive weight and their running weight sums, for bisect sampling."""
    names, cum, total = [], [], 0.0
    for k in keys:
        w = float(weights.get(k, 0.0))
        if w > 0:
            total += w
            names.append(k)
            cum.append(total)
    return names, cum


# --- generator -------------------------------------------------------------------------------------------
class _Generator:
    """Holds the two random streams; `row(i)` makes row i. Rows must be drawn in order 0, 1, 2, ...

    Written for speed (~15-20 us a row on one core): templates are pre-baked, sampling is
    `int(random() * n)` and bisect.
    """

    def __init__(self, seed: int, mix: SyntheticMix):
        mix.validate()
        self.seed = seed
        self.mix = mix
        # Two independent streams (see module docstring): string seeds are hashed with SHA-512 by random,
        # so they are stable across runs and Python processes.
        self.prob_rng = random.Random(f"actprm-synthetic-problems-{seed}")
        self.err_rng = random.Random(f"actprm-synthetic-errors-{seed}")
        self.op_names, self.op_cum = _cumulative(mix.op_weights, OPERATORS)
        self.err_names, self.err_cum = _cumulative(mix.error_weights, ERROR_TYPES)
        self.ranges = {"+": mix.add_range, "-": mix.sub_range, "*": mix.mul_range}
        self.max_value = mix.max_value
        # Correct values never exceed max_value, so the divisors of every reachable value fit in one table.
        lo, hi = mix.div_range
        self.divisors = [tuple(d for d in range(lo, hi + 1) if v % d == 0) for v in range(mix.max_value + 1)]

    def _operand(self, a: int, op: str) -> int | None:
        """A random operand for `a op ?` that keeps the correct value whole and in [1, max_value]."""
        rnd = self.prob_rng.random
        if op == "/":
            divisors = self.divisors[a]
            return divisors[int(rnd() * len(divisors))] if divisors else None
        lo, hi = self.ranges[op]
        if op == "+":
            hi = hi if a + hi <= self.max_value else self.max_value - a
        elif op == "-":
            hi = hi if hi < a else a - 1
        elif hi * a > self.max_value:
            hi = self.max_value // a
        return lo + int(rnd() * (hi - lo + 1)) if lo <= hi else None

    def _problem(self) -> tuple[str, list[tuple], list[str], list[int]]:
        """Question text, correct equations (a, op, b, c), step templates, question numbers in order."""
        rnd, mix, operand = self.prob_rng.random, self.mix, self._operand
        baked = _BAKED[int(rnd() * len(_PERSONAS))][int(rnd() * len(_ITEMS))]
        m = mix.min_steps + int(rnd() * (mix.max_steps - mix.min_steps + 1))
        if rnd() < mix.boxes_share:
            (qlo, qhi), (blo, bhi) = mix.box_count_range, mix.box_size_range
            q, b = qlo + int(rnd() * (qhi - qlo + 1)), blo + int(rnd() * (bhi - blo + 1))
            ask, say = baked["open_boxes"]
            parts, c = [ask % (q, b)], q * b
            eqs, tpls, numbers = [(q, "*", b, c)], [say], [q, b]
        else:
            lo, hi = mix.start_range
            c = lo + int(rnd() * (hi - lo + 1))
            parts, eqs, tpls, numbers = [baked["open_plain"] % c], [], [], [c]
        events, op_names, op_cum, op_total = baked["events"], self.op_names, self.op_cum, self.op_cum[-1]
        for _ in range(m - len(eqs)):
            a = c
            op = op_names[bisect_right(op_cum, rnd() * op_total)]
            b = operand(a, op)
            if b is None:
                # The drawn operator cannot apply to this value; "+" always can unless the value is near
                # max_value, and then "-" can.
                op = "+"
                b = operand(a, op)
                if b is None:
                    op = "-"
                    b = operand(a, op)
            variants = events[op]
            ask, say = variants[int(rnd() * len(variants))]
            parts.append(ask % b)
            c = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a // b
            eqs.append((a, op, b, c))
            tpls.append(say)
            numbers.append(b)
        endings = baked["endings"]
        parts.append(endings[int(rnd() * len(endings))])
        return " ".join(parts), eqs, tpls, numbers

    def _mistake(self, kind: str, k: int, eqs: list[tuple], numbers: list[int]) -> tuple | None:
        """The wrong equation (a, op, b, c) of type `kind` at step k, or None when it cannot occur there."""
        rnd = self.err_rng.random
        a, op, b, c = eqs[k]
        if kind == "arithmetic_slip":
            d = 1 + int(rnd() * self.mix.slip_max)
            return a, op, b, (c + d if rnd() < 0.5 or c < d else c - d)
        if kind == "off_by_ten":
            return a, op, b, (c + 10 if rnd() < 0.5 or c < 10 else c - 10)
        if kind == "digit_transposition":
            s = str(c)
            # swap s[j], s[j+1]: they must differ, and a leading zero would give the swap away
            spots = [j for j in range(len(s) - 1) if s[j] != s[j + 1] and not (j == 0 and s[1] == "0")]
            if not spots:
                return None
            j = spots[int(rnd() * len(spots))]
            return a, op, b, int(s[:j] + s[j + 1] + s[j] + s[j + 2:])
        if kind == "wrong_operator":
            others = [o for o in OPERATORS if o != op]
            start = int(rnd() * len(others))
            for t in range(len(others)):
                o = others[(start + t) % len(others)]
                r = _whole(a, o, b)
                if r is not None and r != c:
                    return a, o, b, r
            return None
        if kind == "wrong_number":
            start = int(rnd() * len(numbers))
            for t in range(len(numbers)):
                b2 = numbers[(start + t) % len(numbers)]
                r = _whole(a, op, b2) if b2 != b else None
                if r is not None and r != c:
                    return a, op, b2, r
            return None
        if kind == "skipped_step":
            if k == 0:
                return None
            a2 = eqs[k - 1][0]  # the value step k-1 started from
            r = _whole(a2, op, b)
            return (a2, op, b, r) if r is not None and r != c else None
        raise ValueError(f"unknown error type {kind!r}")

    def row(self, i: int) -> dict:
        question, eqs, tpls, numbers = self._problem()
        m = len(eqs)
        k, kind = -1, "none"
        rnd = self.err_rng.random
        if rnd() >= self.mix.correct_share:
            kind = self.err_names[bisect_right(self.err_cum, rnd() * self.err_cum[-1])]
            lo = 1 if kind == "skipped_step" else 0
            k0 = lo + int(rnd() * (m - lo))
            wrong = None
            # Start at a uniform step and walk on (wrapping) until the mistake fits.
            for t in range(m - lo):
                k = lo + (k0 - lo + t) % (m - lo)
                wrong = self._mistake(kind, k, eqs, numbers)
                if wrong is not None:
                    break
            if wrong is None:
                kind, k = "arithmetic_slip", k0
                wrong = self._mistake(kind, k, eqs, numbers)
            # Later events apply, correctly, to the wrong running value: locally fine, globally wrong.
            cur, wrong_eqs = wrong[3], eqs[:k] + [wrong]
            for _, op, b, _ in eqs[k + 1:]:
                if type(cur) is int and op != "/":  # the common case, kept off the Fraction path for speed
                    nxt = cur + b if op == "+" else cur - b if op == "-" else cur * b
                    wrong_eqs.append((cur, op, b, nxt))
                else:
                    nxt = _apply(cur, op, b)
                    wrong_eqs.append((_fmt(cur), op, b, _fmt(nxt)))
                cur = nxt
            eqs = wrong_eqs
        steps = [fmt % get(eq) for eq, (fmt, get) in zip(eqs, tpls)]
        steps[-1] += _ANSWER % eqs[-1][3]
        return {
            "id": f"syn-{self.seed}-{i}",
            "question": question,
            "steps": steps,
            "first_error_step": k,
            "source": "synthetic",
            "error_type": kind,
        }


# Named mixes, so a config can say `mix: addsub` (pretraining, benchmarks) instead of repeating the fields.
MIXES = {
    "default": SyntheticMix(),
    # The label-efficiency task (docs/RESULTS.md): add/subtract stories, 2..5 steps, values <= 60, half correct;
    # errors are wrong operators (3) and skipped steps (1).
    "addsub": SyntheticMix(correct_share=0.5, min_steps=2, max_steps=5, boxes_share=0.0, start_range=(2, 20),
                           box_count_range=(2, 2), box_size_range=(3, 4), add_range=(1, 9), sub_range=(1, 9),
                           max_value=60, op_weights={"+": 0.5, "-": 0.5},
                           error_weights={"wrong_operator": 3.0, "skipped_step": 1.0}),
}


# --- public API ------------------------------------------------------------------------------------------
def iter_pool(n: int, seed: int = 0, mix: SyntheticMix | None = None, chunk: int = 10_000) -> Iterator[list[dict]]:
    """Yield the rows of `generate_pool(n, seed, mix)` as lists of at most `chunk` rows, in order.

    Memory stays constant in n (one chunk at a time), so 1M-row pools can be streamed into `write_pool`:

        write_pool((r for c in iter_pool(1_000_000, seed=3) for r in c), "pool.parquet")
    """
    if n < 0 or chunk < 1:
        raise ValueError(f"need n >= 0 and chunk >= 1, got n={n}, chunk={chunk}")
    gen = _Generator(seed, mix if mix is not None else SyntheticMix())
    row = gen.row
    for start in range(0, n, chunk):
        yield [row(i) for i in range(start, min(start + chunk, n))]


def generate_pool(n: int, seed: int = 0, mix: SyntheticMix | None = None) -> list[dict]:
    """n synthetic pool rows (ARCHITECTURE §4 pool row plus `error_type`), deterministic in (seed, mix).

    Each row: id "syn-{seed}-{i}", question, steps (3-8 one-line sentences by default, the last ending in
    "The answer is X."), first_error_step (-1 = all correct), source "synthetic", error_type ("none" or one
    of ERROR_TYPES). See the module docstring for how errors are placed and propagated.
    """
    return [r for c in iter_pool(n, seed, mix, chunk=max(n, 1)) for r in c]


def _pool_schema():
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()),
        ("question", pa.string()),
        ("steps", pa.list_(pa.string())),
        ("first_error_step", pa.int64()),
        ("source", pa.string()),
        ("error_type", pa.string()),
    ])


def write_pool(rows: Iterable[dict], path: str | Path, batch_rows: int = 65_536) -> int:
    """Write rows to `path` (.parquet via pyarrow, .jsonl one JSON object per line); return the row count.

    `rows` may be any iterable, including a generator over `iter_pool`, and is consumed `batch_rows` at a
    time, so writing a 1M-row pool does not hold it in memory. Parquet columns follow the pool-row schema
    (first_error_step int64); keys outside it are dropped. Parent folders of a local path are created.
    """
    path = str(path)
    if path.endswith(".parquet"):
        kind = "parquet"
    elif path.endswith(".jsonl"):
        kind = "jsonl"
    else:
        raise ValueError(f"write_pool: path must end in .parquet or .jsonl, got {path!r}")
    if "://" not in path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    count = 0
    if kind == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                count += 1
        return count

    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _pool_schema()
    with pq.ParquetWriter(path, schema) as writer:
        batch: list[dict] = []
        for r in rows:
            batch.append(r)
            if len(batch) >= batch_rows:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                count, batch = count + len(batch), []
        if batch or count == 0:  # an empty pool still gets a valid file with the schema
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            count += len(batch)
    return count
