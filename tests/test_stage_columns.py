"""The stages' column contract (pipeline/stages.py Stage): every stage declares the columns it needs and adds, a
missing one fails naming stage and column, a stage that loses a row fails; and every column of the active plan
stays Arrow-native from reader to trainer: `steps` is list<string> after each stage, and nothing falls back to
pickled Python objects (init_ray turns that fallback into an error)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from actprm_ray.data.step_format import DEFAULT_SEP, DEFAULT_SYSTEM_PROMPT
from actprm_ray.pipeline.stages import SelectStage, Stage, StageContractError

SELECT = dict(mode="all", delta_pred=0.5, delta_std=0.1, step_threshold=0.5, random_rate=0.0, seed=0)


def _strings(*values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def scored_batch() -> dict:
    """Two rows as SelectStage receives them (Score's output), steps as Ray Data hands them: object arrays."""
    return {"id": _strings("a", "b"), "valid": np.array([True, False]),
            "steps": _strings(np.array(["x", "y"], dtype=object), np.array([], dtype=object)),
            "step_mean": _strings(np.array([0.9, 0.2]), np.array([])),
            "step_std": _strings(np.array([0.01, 0.3]), np.array([]))}


def pool_batch() -> dict:
    """Two rows as the pool reader gives them (data/shards.py), the second one unreadable."""
    return {"id": _strings("a", "b"), "question": _strings("What is 2+3?", None),
            "steps": _strings(["2+3=5.", "So 5."], None), "first_error_step": _strings(1, None),
            "selected": _strings(None, None), "read_error": _strings("", "bad JSON on line 2: x")}


def stage_classes() -> list[type]:
    """Every Stage subclass the package defines (importing the modules that hold them)."""
    import actprm_ray.drivers.label_job  # noqa: F401
    import actprm_ray.drivers.supervised  # noqa: F401
    import actprm_ray.eval.ray_scorer  # noqa: F401
    import actprm_ray.pipeline.filter  # noqa: F401

    found, todo = [], [Stage]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("actprm_ray."):
                found.append(sub)
    return found


def test_every_stage_declares_what_it_needs_and_adds():
    stages = stage_classes()
    assert {"CanonicalizeStage", "CarryCanonicalizeStage", "LabelledCanonicalizeStage", "ScoreStage",
            "FilterScoreStage", "SelectStage", "LabelStage", "PrepareRowsStage", "TokenLimitStage"} <= {c.__name__ for c in stages}
    for cls in stages:
        assert "id" in cls.needs, cls  # outcomes account every row by id
        assert cls.adds and len(set(cls.adds)) == len(cls.adds), cls
        assert not set(cls.drops) & set(cls.adds), cls
        assert cls.process is not Stage.process, cls


@pytest.fixture(scope="module")
def checkpoint(tiny_backbone_dir, tmp_path_factory):
    """A 2-head EnsemblePRM: its tokenizer has the step separator (the bare backbone's has not)."""
    from actprm_ray.model.ensemble_prm import EnsemblePRM, PRMConfig

    model = EnsemblePRM.from_backbone(tiny_backbone_dir, PRMConfig(n_heads=2, init_seed=0, sep=DEFAULT_SEP,
                                                                   system_prompt=DEFAULT_SYSTEM_PROMPT))
    return model.save_pretrained(tmp_path_factory.mktemp("stage_ckpt") / "ckpt")


def cheap_stages(tokenizer_dir) -> list[tuple[Stage, dict]]:
    """Stages that need no model (a tokenizer at most), each with a batch it accepts."""
    from actprm_ray.data.shards import LABEL_COLUMNS
    from actprm_ray.label.base import OracleLabeler
    from actprm_ray.pipeline.filter import CarryCanonicalizeStage
    from actprm_ray.drivers.label_job import PrepareRowsStage
    from actprm_ray.pipeline.stages import CanonicalizeStage, LabelStage
    from actprm_ray.drivers.supervised import LabelledCanonicalizeStage

    prepared = PrepareRowsStage(sep=DEFAULT_SEP)(pool_batch())
    fmt = dict(sep=DEFAULT_SEP, system_prompt=DEFAULT_SYSTEM_PROMPT, max_length=None)
    return [(SelectStage(**SELECT), scored_batch()),
            (PrepareRowsStage(sep=DEFAULT_SEP), pool_batch()),
            (CanonicalizeStage(str(tokenizer_dir), **fmt), pool_batch()),
            (CarryCanonicalizeStage(str(tokenizer_dir), carry=("chunk",), **fmt),
             {**pool_batch(), "chunk": np.array([3, 3])}),
            (LabelledCanonicalizeStage(str(tokenizer_dir), carry=LABEL_COLUMNS, **fmt), pool_batch()),
            (LabelStage(OracleLabeler, None), prepared)]


def test_stages_map_rows_one_to_one_and_keep_their_contract(checkpoint):
    for stage, batch in cheap_stages(checkpoint):
        out = stage(batch)
        assert set(stage.adds) <= set(out), type(stage).__name__
        assert {len(v) for v in out.values()} == {2}, type(stage).__name__
        assert out["id"].tolist() == ["a", "b"]
        assert out["valid"].tolist() == [True, False], type(stage).__name__  # every batch's "b" is unreadable


def test_carried_columns_pass_through_and_labels_replace_the_read_ones(checkpoint):
    stages = {type(stage).__name__: (stage, batch) for stage, batch in cheap_stages(checkpoint)}
    stage, batch = stages["CarryCanonicalizeStage"]
    out = stage(batch)
    assert out["chunk"].tolist() == [3, 3] and out["num_steps_given"].tolist() == [2, 0]
    assert "first_error_step" not in out and "read_error" not in out  # not carried: the raw columns stop here
    stage, batch = stages["LabelledCanonicalizeStage"]
    batch["hard_labels"] = _strings(np.array([1, 1]), None)  # as read: typed arrays, null where none
    out = stage(batch)
    assert out["label_status"].tolist() == ["ok", "failed"] and out["valid"].tolist() == [True, False]
    assert out["hard_labels"].tolist() == [[1, 1], []] and out["first_error_step"].tolist() == [-1, -2]
    assert out["label_source"].tolist() == ["dataset", "dataset"]
    assert pa.array(out["hard_labels"].tolist()).type == pa.list_(pa.int64())


def test_a_missing_column_names_the_stage_and_the_column(checkpoint):
    for stage, batch in cheap_stages(checkpoint):
        name = type(stage).__name__
        for column in stage.needs:
            with pytest.raises(StageContractError, match=rf"^{name}: input batch lacks column\(s\) \['{column}'\]"):
                stage({k: v for k, v in batch.items() if k != column})


def test_a_stage_that_drops_a_row_is_caught():
    class LossySelectStage(SelectStage):
        def process(self, batch):
            return {k: v[:-1] for k, v in super().process(batch).items()}

    with pytest.raises(StageContractError, match=r"LossySelectStage: 2 rows in.*a stage maps each row to one row"):
        LossySelectStage(**SELECT)(scored_batch())


def test_a_stage_must_return_exactly_the_columns_it_declares():
    class ChattySelectStage(SelectStage):
        def process(self, batch):
            return {**super().process(batch), "note": np.zeros(len(batch["id"]))}

    with pytest.raises(StageContractError, match=r"ChattySelectStage: process returned columns .*'note'"):
        ChattySelectStage(**SELECT)(scored_batch())


def test_the_base_passes_input_through_keeps_drops_and_hands_lists_to_arrow():
    class KeepStage(Stage):
        needs, adds, keeps = ("id",), ("n",), ("id", "steps")

        def process(self, batch):
            return {"n": np.arange(len(batch["id"]))}

    out = SelectStage(**SELECT)(scored_batch())  # keeps everything: the input columns pass through
    assert set(scored_batch()) < set(out) and out["selected"].tolist() == [True, False]
    assert out["steps"].tolist() == [["x", "y"], []] and isinstance(out["steps"][0], list)  # Arrow-native
    assert pa.array(out["steps"].tolist()).type == pa.list_(pa.string())
    assert list(KeepStage()(scored_batch())) == ["id", "steps", "n"]

    class DropStage(KeepStage):
        drops = ("steps",)

    assert list(DropStage()(scored_batch())) == ["id", "n"]


def chunked_rows(checkpoint) -> dict:
    """Five rows of two chunks, interleaved, as the filter's Canonicalize hands them on; row "d" is invalid."""
    from actprm_ray.pipeline.filter import CarryCanonicalizeStage

    steps = [["1+1=2.", "So 2."], ["2+2=4."], ["3+3=6.", "6-1=5.", "So 5."], [], ["4+4=8.", "So 8."]]
    batch = {"id": _strings("a", "b", "c", "d", "e"), "question": _strings(*["Add."] * 5), "steps": _strings(*steps),
             "shard": np.zeros(5, dtype=np.int64), "chunk": np.array([0, 1, 0, 1, 1]),
             "chunk_rows": np.array([2, 3, 2, 3, 3])}
    stage = CarryCanonicalizeStage(str(checkpoint), sep=DEFAULT_SEP, system_prompt=DEFAULT_SYSTEM_PROMPT,
                                   max_length=None, carry=("shard", "chunk", "chunk_rows"))
    return stage(batch)


def test_filter_stages_chain_and_score_each_chunk_on_its_own(checkpoint):
    from actprm_ray.pipeline.filter import WORK_SCHEMA, FilterScoreStage, finish_chunk
    from actprm_ray.pipeline.stages import ScoreStage

    canonical = chunked_rows(checkpoint)
    scorer = FilterScoreStage(str(checkpoint), batch_size=2, dtype="float32", model_version=7, unbiased_std=False)
    out = scorer(canonical)
    assert out["id"].tolist() == ["a", "b", "c", "d", "e"] and out["chunk"].tolist() == [0, 1, 0, 1, 1]
    assert "input_ids" not in out and "readout_positions" not in out  # scored: the tokens go
    assert out["model_version"].tolist() == [7] * 5
    # Each row's scores are its chunk's, scored alone (the rows in input order, the invalid one empty).
    plain = ScoreStage(str(checkpoint), batch_size=2)
    for chunk, rows in ((0, [0, 2]), (1, [1, 3, 4])):
        alone = plain({k: v[np.asarray(rows)] for k, v in canonical.items()})
        for j, i in enumerate(rows):
            assert out["step_mean"][i].tolist() == alone["step_mean"][j].tolist()
    assert [len(m) for m in out["step_mean"]] == [2, 1, 3, 0, 2]
    table = finish_chunk(out, mode="all", delta_pred=0.5, delta_std=0.1, step_threshold=0.5, random_rate=0.0,
                         seed=0, std_estimator="population")
    assert table.schema == WORK_SCHEMA and table.column("id").to_pylist() == ["a", "b", "c", "d", "e"]
    assert table.column("selected").to_pylist() == [True, True, True, False, True]
    with pytest.raises(StageContractError, match=r"^finish_chunk: input batch lacks column\(s\) \['shard'\]"):
        finish_chunk({k: v for k, v in out.items() if k != "shard"}, mode="all", delta_pred=0.5, delta_std=0.1,
                     step_threshold=0.5, random_rate=0.0, seed=0, std_estimator="population")


def test_write_chunk_writes_each_chunk_from_the_worker_and_returns_only_counts(checkpoint, tmp_path):
    import pyarrow.parquet as pq

    from actprm_ray.pipeline.filter import (CHUNK_COUNTS_SCHEMA, FilterScoreStage, finish_chunk, work_file,
                                            write_chunk)

    scorer = FilterScoreStage(str(checkpoint), batch_size=2, dtype="float32", model_version=7, unbiased_std=False)
    table = finish_chunk(scorer(chunked_rows(checkpoint)), mode="all", delta_pred=0.5, delta_std=0.1,
                         step_threshold=0.5, random_rate=0.0, seed=0, std_estimator="population")
    counts = write_chunk(table, output=str(tmp_path / "out"), write_all=False)
    assert counts.schema == CHUNK_COUNTS_SCHEMA
    # Rows a, c are chunk 0 (both scored, selected); b, d, e chunk 1, where d has no visible step (invalid).
    assert counts.to_pylist() == [
        {"shard": 0, "chunk": 0, "read": 2, "scored": 2, "retained": 2, "discarded": 0, "invalid": 0,
         "invalid_reasons": "{}"},
        {"shard": 0, "chunk": 1, "read": 3, "scored": 2, "retained": 2, "discarded": 0, "invalid": 1,
         "invalid_reasons": json.dumps({table.column("invalid_reason")[3].as_py(): 1})}]
    out = tmp_path / "out"
    assert pq.read_table(out / work_file(0, "retained", 0)).column("id").to_pylist() == ["a", "c"]
    assert pq.read_table(out / work_file(0, "retained", 1)).column("id").to_pylist() == ["b", "e"]
    assert pq.read_table(out / work_file(0, "invalid", 1)).column("id").to_pylist() == ["d"]
    assert pq.read_table(out / work_file(0, "invalid", 0)).num_rows == 0
    assert not (out / work_file(0, "discarded", 0)).exists()  # only with write_all
    assert not list(out.rglob(".tmp-*"))
    # Part of a chunk would overwrite its other part's files: refused.
    with pytest.raises(RuntimeError, match="chunk 1 of shard 0 reached the write stage split"):
        write_chunk(table.slice(1, 1), output=str(tmp_path / "split"), write_all=False)


def test_filter_score_refuses_a_missing_chunk_key_or_part_of_a_chunk(checkpoint):
    from actprm_ray.pipeline.filter import FilterScoreStage

    canonical = chunked_rows(checkpoint)
    scorer = FilterScoreStage(str(checkpoint), batch_size=2, dtype="float32", model_version=0, unbiased_std=False)
    missing = r"^FilterScoreStage: input batch lacks column\(s\) \['chunk_rows'\]"
    with pytest.raises(StageContractError, match=missing):
        scorer({k: v for k, v in canonical.items() if k != "chunk_rows"})
    with pytest.raises(RuntimeError, match="chunk 1 of shard 0 reached the scorer split \\(2 of 3 rows\\)"):
        scorer({k: v[:4] for k, v in canonical.items()})  # row "e" of chunk 1 is in another batch


def test_arrow_lists_hands_string_lists_back_as_lists():
    from actprm_ray.pipeline.stages import arrow_lists

    steps = np.empty(2, dtype=object)
    steps[0], steps[1] = np.array(["a", "b"], dtype=object), np.array([], dtype=object)
    ids = np.empty(2, dtype=object)
    ids[0], ids[1] = np.array([1, 2]), np.array([3])  # typed int arrays convert natively: left alone
    out = arrow_lists({"steps": steps, "input_ids": ids, "n": np.arange(2)})
    assert out["steps"].tolist() == [["a", "b"], []] and isinstance(out["steps"][0], list)
    assert out["input_ids"] is ids and out["n"] is not None
    assert pa.array(out["steps"].tolist()).type == pa.list_(pa.string())


@pytest.mark.ray
def test_steps_stay_list_of_string_through_every_stage(ray_local, tiny_backbone_dir, tmp_path):
    from actprm_ray.config import load_config
    from actprm_ray.data.shards import index_pool, read_pool_rows
    from actprm_ray.data.synthetic import generate_pool, write_pool
    from actprm_ray.model.ensemble_prm import EnsemblePRM, PRMConfig
    from actprm_ray.pipeline.plan import build_active_plan

    rows = generate_pool(24, seed=3)
    rows[0]["steps"] = []  # an invalid row: its steps leave Canonicalize empty, the case that broke conversion
    pool = tmp_path / "pool.parquet"
    write_pool(rows, pool)
    init = EnsemblePRM.from_backbone(tiny_backbone_dir, PRMConfig(n_heads=2, init_seed=0)).save_pretrained(
        tmp_path / "init")
    cfg = load_config(None, ["selection.mode=all"])
    assert not ray_local.data.DataContext.get_current().enable_fallback_to_arrow_object_ext_type
    # With the fallback off, a stage whose output Arrow cannot hold fails the run: one pass checks every stage.
    plan = build_active_plan(cfg, init_dir=str(init), coordinator_name="")
    ds = plan.apply(read_pool_rows(index_pool(str(pool)), num_cpus=0.25)).materialize()
    schema = ds.schema(fetch_if_missing=True)
    types = dict(zip(schema.names, schema.types))
    assert types["steps"] == pa.list_(pa.string()), types["steps"]
    assert not [n for n, t in types.items() if "pickled" in str(t) or "Python" in str(t)], types
    out = ds.take_all()
    assert len(out) == 24 and sum(not r["valid"] for r in out) == 1
