"""train/replay.py: the bounded replay buffer (reservoir sample of the rows a rank trained), without Ray."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from actprm_ray.train.replay import ReplayBuffer, replay_row


def _row(i: int) -> dict:
    n = 1 + i % 3
    return replay_row({"id": f"r{i}", "input_ids": list(range(50_000, 50_010 + i)), "readout_positions": [3, 6, 9][:n],
                       "hard_labels": [1] * n}, inline=False)


def _ids(rows: list[dict]) -> list[str]:
    return [r["id"] for r in rows]


def test_keeps_every_row_until_full_and_draws_without_replacement_reproducibly():
    buf = ReplayBuffer(capacity=100, seed=7, rank=0)
    assert buf.draw(8, draw=0) == []  # nothing trained yet: the trainer steps on a dummy row
    for i in range(30):
        buf.add(_row(i))
    assert _ids(buf.rows) == [f"r{i}" for i in range(30)] and buf.seen == 30
    drawn = _ids(buf.draw(8, draw=3))
    assert len(set(drawn)) == 8
    assert _ids(buf.draw(8, draw=3)) == drawn  # the same draw number, the same rows (a resumed run)
    assert _ids(buf.draw(8, draw=4)) != drawn
    assert _ids(ReplayBuffer(100, seed=7, rank=1).rows) == []
    assert buf.rows[0]["input_ids"].dtype == np.int32  # ~9x smaller than a list of Python ints


def test_a_full_buffer_holds_a_uniform_sample_of_every_row_offered():
    n, cap, trials = 20, 5, 2000
    kept = Counter()
    for seed in range(trials):
        buf = ReplayBuffer(capacity=cap, seed=seed, rank=0)
        for i in range(n):
            buf.add(_row(i))
        assert len(buf) == cap and buf.seen == n and len(set(_ids(buf.rows))) == cap
        kept.update(_ids(buf.rows))
    # Each row is kept with probability cap / n = 0.25 (binomial sd over 2,000 trials: 0.0097). Keeping the first
    # or the last rows, or favouring either, would put some row's rate far outside this band.
    rates = {k: v / trials for k, v in kept.items()}
    assert len(rates) == n
    assert all(abs(r - cap / n) < 0.05 for r in rates.values()), rates


def test_saved_and_loaded_it_goes_on_as_if_never_interrupted(tmp_path):
    straight = ReplayBuffer(capacity=10, seed=3, rank=2)
    for i in range(25):
        straight.add(_row(i))
    first = ReplayBuffer(capacity=10, seed=3, rank=2)
    for i in range(15):
        first.add(_row(i))
    first.save(tmp_path / "replay_rank2.parquet")
    resumed = ReplayBuffer.load(tmp_path / "replay_rank2.parquet", capacity=10, seed=3, rank=2)
    assert resumed.seen == 15 and _ids(resumed.rows) == _ids(first.rows)
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) and list(a["hard_labels"]) == list(b["hard_labels"])
               for a, b in zip(resumed.rows, first.rows))
    for i in range(15, 25):
        resumed.add(_row(i))
    assert _ids(resumed.rows) == _ids(straight.rows)
    assert _ids(resumed.draw(4, draw=9)) == _ids(straight.draw(4, draw=9))
    empty = ReplayBuffer.load(tmp_path / "missing.parquet", capacity=10, seed=3, rank=2)
    assert len(empty) == 0 and empty.seen == 0


def test_a_smaller_capacity_on_resume_keeps_the_first_rows(tmp_path):
    with pytest.raises(ValueError, match="capacity 0"):
        ReplayBuffer(0, seed=0, rank=0)
    buf = ReplayBuffer(capacity=10, seed=0, rank=0)
    for i in range(10):
        buf.add(_row(i))
    buf.save(tmp_path / "r.parquet")
    small = ReplayBuffer.load(tmp_path / "r.parquet", capacity=4, seed=0, rank=0)
    assert _ids(small.rows) == ["r0", "r1", "r2", "r3"] and small.seen == 10
