"""Every column of the active plan stays Arrow-native from reader to trainer: `steps` is list<string> after each
stage, and nothing falls back to pickled Python objects (init_ray turns that fallback into an error)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

pytestmark = pytest.mark.ray


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
