"""Soak: the streaming loop under injected faults. Bad rows, a flaky judge, and actor kills, all at once.

One run of the loop (`run_active`, its own local Ray) over a synthetic pool where a fraction of rows is broken
(empty steps, whitespace-only steps, an empty question, a step too long for max_length, first_error_step out of
range). Labels come from a real HTTP judge on loopback (`tests/fake_judge.py`) that answers 500,
drops the connection or writes garbage at random. Mid-run, a scorer actor is SIGKILLed, then a labeler actor.

It reports, and checks (exit 1 if any fails): the accounting identity, one outcome per row, every bad row
ending as invalid_input, and no request billed twice by the judge beyond those in flight when the labeler died
(`labeler.judge.http.max_concurrency`: their answers never arrived, so they are sent again).

    python benchmarks/soak.py                          # 2,000 rows, ~10 min on a 2-core machine
    python benchmarks/soak.py --rows 400               # quick
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
# The fake judge and the actor killer are test fakes: they live in tests/ (not shipped in the package), which is
# not a package itself, so its folder goes on the path as pytest puts it there for the tests.
sys.path.insert(0, str(REPO / "tests"))

BAD_KINDS = {
    "empty_steps": lambda r: {**r, "steps": []},
    "whitespace_step": lambda r: {**r, "steps": [r["steps"][0], "   \n\t "]},
    "empty_question": lambda r: {**r, "question": ""},
    "overlong_first_step": lambda r: {**r, "steps": ["7 " * 20_000] + r["steps"][1:]},
    "first_error_out_of_range": lambda r: {**r, "first_error_step": len(r["steps"]) + 3},
    "first_error_below_minus_one": lambda r: {**r, "first_error_step": -7},
}


def make_pool(n: int, bad_rate: float, path: Path, seed: int) -> dict[str, str]:
    """Write the pool; return {id: bad kind} for the rows that were broken on purpose."""
    from actprm_ray.data.synthetic import generate_pool, write_pool

    rng = random.Random(seed)
    rows, bad = [], {}
    for r in generate_pool(n, seed=seed):
        if rng.random() < bad_rate:
            kind = rng.choice(sorted(BAD_KINDS))
            r, bad[r["id"]] = BAD_KINDS[kind](r), kind
        rows.append(r)
    write_pool(rows, path)
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--bad_rate", type=float, default=0.05)
    ap.add_argument("--judge_fault_rate", type=float, default=0.15, help="split evenly: 500, dropped, garbage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/actprm_soak")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "soak.json"))
    a = ap.parse_args(argv)

    import pyarrow.parquet as pq

    from actprm_ray.config import load_config
    from actprm_ray.drivers.active import run_active
    from actprm_ray.pipeline.coordinator import coordinator_name
    from fake_judge import FakeJudge
    from fault_injection import kill_when

    work = Path(a.work)
    name = f"soak_{a.rows}_{int(time.time())}"
    pool = work / f"pool_{a.rows}_{a.seed}.parquet"
    bad = make_pool(a.rows, a.bad_rate, pool, a.seed)
    rate = a.judge_fault_rate / 3
    in_flight = 8  # labeler.judge.http.max_concurrency (the default), one labeler
    faults = {"error500": rate, "drop": rate, "garbage": rate}
    with FakeJudge(fault_rates=faults, seed=a.seed, latency_s=0.02) as judge:
        cfg = load_config(None, [
            f"run.name={name}", f"run.output_dir={work}", f"data.pool={pool}", "model.n_heads=8",
            "labeler.kind=http", "labeler.judge.judge_id=soak-judge", "labeler.judge.model=soak-judge",
            f"labeler.judge.http.base_url={judge.base_url}", "labeler.judge.http.qps=0",
            "labeler.judge.http.backoff_s=0.05", "labeler.judge.http.max_backoff_s=0.2", "labeler.judge.max_attempts=2",
            "pipeline.no_progress_timeout_s=600", "pipeline.status_every_s=30", "train.checkpoint_every=10"])
        killed: dict[str, list[int]] = {"ScoreStage": [], "LabelStage": []}
        coord = coordinator_name(name)
        killers = [
            threading.Thread(target=kill_when, args=(coord, lambda s: s.get("scored", 0) >= a.rows // 4, "ScoreStage",
                                                     killed["ScoreStage"]), daemon=True),
            threading.Thread(target=kill_when, args=(coord, lambda s: s.get("labelled", 0) >= a.rows // 8,
                                                     "LabelStage", killed["LabelStage"]), daemon=True)]
        for k in killers:
            k.start()
        started = time.time()
        summary = run_active(cfg)
        wall = time.time() - started

    rows = pq.read_table(Path(summary["run_dir"]) / "outcomes.parquet").to_pylist()
    by_id = {r["id"]: r for r in rows}
    bad_not_invalid = {i: by_id[i]["outcome"] for i in bad if by_id[i]["outcome"] != "invalid_input"}
    repaid = sum(c - 1 for c in judge.calls.values())
    checks = {
        "identity_holds": summary["identity_holds"],
        "one_outcome_per_row": len(by_id) == len(rows) == a.rows,
        "every_bad_row_invalid_input": not bad_not_invalid,
        "repaid_at_most_in_flight": repaid <= in_flight,
        "scorer_killed": bool(killed["ScoreStage"]),
        "labeler_killed": bool(killed["LabelStage"]),
    }
    failed_reasons = Counter(r["reason"].split(":")[0][:60] for r in rows if r["outcome"] == "label_failed")
    report = {
        "rows": a.rows, "wall_s": wall, "bad_rows": dict(Counter(bad.values())), "outcomes": summary["outcomes"],
        "checks": checks, "bad_rows_not_invalid": bad_not_invalid,
        "judge_requests_by_fault": dict(judge.replies), "judge_billed_critiques": sum(judge.calls.values()),
        "judge_repaid_requests": repaid,
        "labels_used": summary["labels_used"], "label_failed_reasons": dict(failed_reasons),
        "killed_pids": killed, "trainer": summary["trainer"], "run_dir": summary["run_dir"],
    }
    print(f"\nsoak: {a.rows} rows in {wall:.0f}s  outcomes {summary['outcomes']}")
    print(f"judge requests by fault {dict(judge.replies)}; billed critiques {report['judge_billed_critiques']}"
          f" (paid twice: {repaid})")
    print(f"{'check':<30} ok")
    for k, v in checks.items():
        print(f"{k:<30} {v}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
