"""The run ledger and the budget's pure logic: append-only parts, merge on read, grants rebuilt from storage."""

from __future__ import annotations

from actprm_ray.label.base import GrantBook
from actprm_ray.label.cache import CacheEntry, LabelCache
from actprm_ray.ledger import GRANT_SCHEMA, LedgerFolder, grants_folder
from actprm_ray.pipeline import outcomes as oc
from actprm_ray.pipeline.coordinator import ledger_state


def test_a_folder_appends_parts_merges_them_on_read_and_compacts(tmp_path):
    folder = LedgerFolder(str(tmp_path / "grants"), GRANT_SCHEMA)
    assert folder.read().num_rows == 0 and folder.append([]) is None
    folder.append([{"key": "a", "cached": False, "granted_at": 1.0}])
    folder.append([{"key": "b", "cached": True, "granted_at": 2.0}, {"key": "c", "cached": False, "granted_at": 3.0}])
    (tmp_path / "grants" / ".tmp-half-written.parquet").write_bytes(b"PAR1 cut off")  # a writer killed mid-write
    assert sorted(folder.read().column("key").to_pylist()) == ["a", "b", "c"]
    assert folder.compact() == 2 and len(folder.part_names()) == 1
    assert sorted(LedgerFolder(str(tmp_path / "grants"), GRANT_SCHEMA).read().column("key").to_pylist()) == ["a", "b", "c"]


def test_a_folder_takes_a_uri(tmp_path):
    folder = LedgerFolder(f"file://{tmp_path}/ledger/grants", GRANT_SCHEMA)
    folder.append([{"key": "a", "cached": False, "granted_at": 1.0}])
    assert (tmp_path / "ledger" / "grants").is_dir() and folder.read().num_rows == 1


def test_max_labels_counts_distinct_keys_cache_hits_included_and_granting_is_idempotent():
    book = GrantBook(max_labels=3)
    flags, new = book.grant(["a", "b"], [False, True])
    assert flags == [True, True] and new == [("a", False), ("b", True)]
    flags, new = book.grant(["a", "c", "d"], [False, False, False])  # a again: free, and not new
    assert flags == [True, True, False] and new == [("c", False)]
    assert book.exhausted() and book.state()["labels"] == 3 and book.state()["cached"] == 1


def test_the_token_cap_is_checked_before_a_request_with_outstanding_requests_counted():
    book = GrantBook(max_judge_tokens=250, tokens_per_request=100)
    assert book.grant(["a", "b", "c"], [False] * 3)[0] == [True, True, False]  # 2 x 100 fit, 3 x 100 do not
    assert book.grant(["h"], [True])[0] == [True]  # a cache hit costs no tokens
    book.spend_tokens("a", 10, 80)
    book.spend_tokens("b", 10, 80)
    assert book.generated_tokens == 160 and book.outstanding == 0
    assert book.grant(["c"], [False])[0] == [False] and book.exhausted()  # 160 + 100 > 250


def test_the_stop_needs_the_budget_spent_and_every_granted_key_consumed():
    book = GrantBook(max_labels=2)
    book.grant(["a", "b"], [False, False])
    book.consume(["a", "zzz"])  # a key never granted is ignored
    assert not book.all_granted_consumed()
    book.consume(["b", "b"])
    assert book.all_granted_consumed()
    unlimited = GrantBook()
    unlimited.grant(["a"], [False])
    unlimited.consume(["a"])
    assert not unlimited.all_granted_consumed()  # no cap: the run ends with its stream


def test_a_restarted_coordinator_rebuilds_grants_spend_and_consumed_keys_from_the_ledger(tmp_path):
    ledger, cache_path = str(tmp_path / "ledger"), str(tmp_path / "ledger" / "labels")
    grants_folder(ledger).append([{"key": k, "cached": k == "h", "granted_at": 0.0} for k in ("a", "b", "h", "t")])
    cache = LabelCache(cache_path)
    entry = dict(k=0, reason="", critique="c", source="http:j", num_steps=2, attempts=1)
    cache.put_many([CacheEntry(key="a", status="ok", prompt_tokens=30, generated_tokens=70, **entry),
                    CacheEntry(key="t", status="transient", prompt_tokens=0, generated_tokens=0, **entry),
                    CacheEntry(key="other-run", status="ok", prompt_tokens=5, generated_tokens=5, **entry)])
    oc.write_outcome_part([oc.outcome_row("r1", oc.TRAINED, label_key="a"),
                           oc.outcome_row("r2", oc.CONFIDENT)], tmp_path / "outcomes" / "p.parquet")
    granted, spent, final = ledger_state(ledger, cache_path, tmp_path / "outcomes")
    assert granted == {"a": False, "b": False, "h": True, "t": False}
    assert spent == {"a": (30, 70), "t": (0, 0)}  # only this run's grants: a shared cache holds other runs' labels
    assert final == {"a"}

    book = GrantBook(max_labels=4)
    book.restore(granted, spent, final)
    assert book.exhausted() and book.generated_tokens == 70 and book.consumed == {"a"}
    assert book.grant(["b", "t", "new"], [False] * 3)[0] == [True, True, False]  # re-asking is free; no room left


def test_outcome_parts_of_an_uncommitted_checkpoint_leave_the_table(tmp_path):
    from actprm_ray.pipeline import outcomes as oc

    out = tmp_path / "run" / "outcomes"
    for rank, flush, ids in [(0, 0, ["a"]), (1, 0, ["b"]), (0, 1, ["c"]), (1, 1, ["d"]), (0, 2, ["e"])]:
        oc.write_outcome_part([oc.outcome_row(i, oc.TRAINED) for i in ids],
                              out / f"rank{rank}-flush{flush:06d}-{flush}{rank}.parquet")
    # The restored checkpoint covers flushes 0 and 1 (its trainer_state says flushes=2): flush 2 never committed.
    moved = oc.quarantine_uncommitted(out, committed=2)
    assert moved == ["rank0-flush000002-20.parquet"]
    assert sorted(oc.read_outcome_parts(out).column("id").to_pylist()) == ["a", "b", "c", "d"]
    assert (tmp_path / "run" / oc.UNCOMMITTED / moved[0]).is_file()  # kept for the record, out of the table
    assert oc.quarantine_uncommitted(out, committed=2) == []  # idempotent
    # No checkpoint at all (committed 0): nothing the trainer recorded is in the weights.
    assert len(oc.quarantine_uncommitted(out, committed=0)) == 4 and oc.read_outcome_parts(out).num_rows == 0
    assert oc.committed_flushes(tmp_path / "run" / "ray_train", "never_ran") == 0
