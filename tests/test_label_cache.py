"""LabelCache: content-hash keys, durable storage in a ledger folder, transient records, several writer processes."""

from __future__ import annotations

import multiprocessing as mp
import pickle

from actprm_ray.label.base import NO_LABEL
from actprm_ray.label.cache import CacheEntry, LabelCache, label_key

SAMPLING = dict(temperature=0.5, top_p=0.95, max_tokens=8192, seed=0, guided=False)


def entry(key: str, status: str = "ok", k: int = 1, **kw) -> CacheEntry:
    base = dict(key=key, status=status, k=k, reason="", critique=f"critique of {key}", source="vllm:j", num_steps=3,
                prompt_tokens=100, generated_tokens=40, attempts=1)
    base.update(kw)
    return CacheEntry(**base)


def test_key_is_a_sha256_hex_that_depends_on_every_part():
    base = label_key("q", ["a", "b"], "judge", "v1", SAMPLING)
    assert len(base) == 64 and int(base, 16) >= 0
    assert label_key("q", ["a", "b"], "judge", "v1", dict(reversed(list(SAMPLING.items())))) == base
    variants = [
        label_key("q2", ["a", "b"], "judge", "v1", SAMPLING),
        label_key("q", ["a", "b2"], "judge", "v1", SAMPLING),
        label_key("q", ["a"], "judge", "v1", SAMPLING),
        label_key("q", ["ab"], "judge", "v1", SAMPLING),  # step boundaries matter, not just the concatenation
        label_key("q", ["a", "b"], "judge2", "v1", SAMPLING),
        label_key("q", ["a", "b"], "judge", "v2", SAMPLING),
        label_key("q", ["a", "b"], "judge", "v1", {**SAMPLING, "temperature": 0.0}),
        label_key("q", ["a", "b"], "judge", "v1", {**SAMPLING, "seed": 1}),
    ]
    assert len(set(variants + [base])) == len(variants) + 1


def test_round_trip_includes_invalid_results(tmp_path):
    cache = LabelCache(tmp_path / "labels")
    good = entry("k1", k=-1, mismatch=True)
    bad = entry("k2", status="failed", k=NO_LABEL, reason="no <conclusion> tag", attempts=3, generated_tokens=900)
    cache.put_many([good, bad])
    got = cache.get_many(["k1", "k2", "absent"])
    assert set(got) == {"k1", "k2"}
    assert got["k1"].k == -1 and got["k1"].mismatch is True and got["k1"].status == "ok"
    assert got["k2"].status == "failed" and got["k2"].reason == "no <conclusion> tag"
    assert got["k2"].attempts == 3 and got["k2"].generated_tokens == 900 and got["k2"].critique == "critique of k2"
    assert got["k2"].created_at > 0
    assert cache.stats() == {"ok": dict(count=1, prompt_tokens=100, generated_tokens=40),
                             "failed": dict(count=1, prompt_tokens=100, generated_tokens=900)}


def test_a_later_put_replaces_and_empty_calls_are_no_ops(tmp_path):
    cache = LabelCache(tmp_path / "labels")
    cache.put_many([])
    assert cache.get_many([]) == {}
    cache.put_many([entry("k", status="failed", k=NO_LABEL, reason="r")])
    cache.put_many([entry("k", k=2)])
    assert len(cache) == 1 and cache.get_many(["k"])["k"].k == 2


def test_durable_across_instances_and_compaction_keeps_every_entry(tmp_path):
    path = tmp_path / "sub" / "labels"
    LabelCache(path).put_many([entry("k")])
    LabelCache(path).put_many([entry("k2", status="failed", k=NO_LABEL, reason="r")])
    assert LabelCache(path).get_many(["k"])["k"].critique == "critique of k"
    cache = LabelCache(path)
    assert cache.compact() == 2
    assert len(list(path.glob("*.parquet"))) == 1
    assert set(LabelCache(path).get_many(["k", "k2"])) == {"k", "k2"} and len(cache) == 2


def test_a_transient_record_is_kept_but_never_a_hit(tmp_path):
    cache = LabelCache(tmp_path / "labels")
    cache.put_many([entry("k", status="transient", k=NO_LABEL, reason="HTTP 503", prompt_tokens=0,
                          generated_tokens=0)])
    assert cache.get_many(["k"]) == {} and len(cache) == 0
    assert cache.latest(["k"])["k"].reason == "HTTP 503"
    cache.put_many([entry("k", k=0)])  # the rerun's answer replaces it
    assert LabelCache(tmp_path / "labels").get_many(["k"])["k"].status == "ok"


def test_many_keys_beyond_one_statement(tmp_path):
    cache = LabelCache(tmp_path / "labels")
    cache.put_many([entry(f"k{i}", k=i % 3 - 1) for i in range(1234)])
    got = cache.get_many([f"k{i}" for i in range(0, 1234, 1)] + ["k5"])  # a duplicate key is fine
    assert len(got) == 1234 and got["k1000"].k == 1000 % 3 - 1


def test_pickles_without_its_connection(tmp_path):
    cache = LabelCache(tmp_path / "labels")
    cache.put_many([entry("k")])
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.get_many(["k"])["k"].status == "ok"
    clone.put_many([entry("k2")])
    assert len(cache) == 2


def _writer(path: str, worker: int, rounds: int, per_round: int) -> None:
    cache = LabelCache(path)
    for r in range(rounds):
        cache.put_many([entry(f"w{worker}-{r}-{i}") for i in range(per_round)])
        cache.get_many([f"w{(worker + 1) % 4}-{r}-0"])  # interleave reads with the other writers


def test_several_processes_write_at_once(tmp_path):
    path = str(tmp_path / "labels")
    LabelCache(path)  # create the folder once, as the driver would
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 20, 10)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert len(LabelCache(path)) == 4 * 20 * 10
