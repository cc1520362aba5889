"""Sequence packing (data/collate.pack_encoded): packed scores equal padded scores to 1e-5 in fp32."""

import random

import pytest
import torch

from actprm_ray.data.collate import pack_encoded
from actprm_ray.data.synthetic import generate_pool
from actprm_ray.model.ensemble_prm import EnsemblePRM, PRMConfig
from actprm_ray.model.scoring import score_encoded
from actprm_ray.data.step_format import encode_trajectory
from actprm_ray.model.tiny import build_tiny_backbone


@pytest.fixture(scope="module")
def model_and_rows(tmp_path_factory):
    torch.manual_seed(0)
    model = EnsemblePRM.from_backbone(build_tiny_backbone(tmp_path_factory.mktemp("bb")), PRMConfig(n_heads=8))
    # Train-free but not degenerate: random heads on a random backbone give µ spread around 0.5.
    rows = generate_pool(40, seed=3)
    encoded = []
    for r in rows:
        e = encode_trajectory(model.tokenizer, r["question"], r["steps"], sep=model.config.sep,
                              system_prompt=model.config.system_prompt)
        encoded.append({"input_ids": e.input_ids, "readout_positions": e.readout_positions})
    random.Random(0).shuffle(encoded)
    return model.float().eval(), encoded


def test_pack_layout():
    rows = [{"input_ids": [1] * n, "readout_positions": [n - 1]} for n in (5, 3, 4, 9)]
    packs = pack_encoded(rows, max_tokens=8)
    assert [p["rows"] for p in packs] == [[0, 1], [2], [3]]  # 5+3 fills 8; 4+9 > 8; 9 alone (over the limit)
    p = packs[0]
    assert p["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert p["readout_pos"].tolist() == [4, 7] and p["step_row"].tolist() == [0, 1]


@pytest.mark.parametrize("pack_tokens", [600, 4096])
def test_packed_scores_equal_padded(model_and_rows, pack_tokens):
    model, encoded = model_and_rows
    padded = score_encoded(model, encoded, batch_size=8)
    packed = score_encoded(model, encoded, pack_tokens=pack_tokens)
    assert len(pack_encoded(encoded, pack_tokens)) < len(encoded)  # rows really share lines
    worst_mu = max(abs(a - b) for p, q in zip(padded, packed) for a, b in zip(p["step_mean"], q["step_mean"]))
    worst_sd = max(abs(a - b) for p, q in zip(padded, packed) for a, b in zip(p["step_std"], q["step_std"]))
    assert [len(p["step_mean"]) for p in padded] == [len(q["step_mean"]) for q in packed]
    assert worst_mu <= 1e-5 and worst_sd <= 1e-5, (worst_mu, worst_sd)


def test_packing_without_row_boundaries_differs(model_and_rows):
    """The check above can fail: the same packed line with plain 0..T-1 position ids (no row boundaries)
    lets rows attend to each other and changes µ."""
    model, encoded = model_and_rows
    pack = pack_encoded(encoded[:6], max_tokens=10_000)[0]
    with torch.no_grad():
        mu_rows, _ = model.score(pack)
        flat = {**pack, "position_ids": torch.arange(pack["input_ids"].shape[1]).unsqueeze(0)}
        mu_flat, _ = model.score(flat)
    first = pack["step_row"] == 0  # row 0 starts the line, so it sees the same tokens and positions either way
    assert torch.allclose(mu_rows[first], mu_flat[first], atol=1e-5)
    assert (mu_rows[~first] - mu_flat[~first]).abs().max() > 1e-3


def test_score_stage_packs(model_and_rows, tmp_path):
    """pipeline.score_pack_tokens reaches the scorer stage (called without Ray) and changes nothing but speed."""
    import numpy as np

    from actprm_ray.pipeline.stages import ScoreStage

    model, encoded = model_and_rows
    model.save_pretrained(tmp_path / "ckpt")
    batch = {"id": np.array([f"r{i}" for i in range(len(encoded))], dtype=object),
             "input_ids": [e["input_ids"] for e in encoded],
             "readout_positions": [e["readout_positions"] for e in encoded],
             "valid": np.ones(len(encoded), dtype=bool)}
    padded = ScoreStage(str(tmp_path / "ckpt"), batch_size=8)(dict(batch))
    stage = ScoreStage(str(tmp_path / "ckpt"), pack_tokens=1024)
    packed = stage(dict(batch))
    assert stage.pack_tokens == 1024
    worst = max(abs(a - b) for p, q in zip(padded["step_mean"], packed["step_mean"]) for a, b in zip(p, q))
    assert worst <= 1e-5


def test_score_stage_uses_the_configured_attention(tiny_backbone_dir, tmp_path):
    """model.attn_implementation reaches the scorers, not only the trainer (it was a trainer-only key), and the
    kernel changes no score: eager and sdpa agree."""
    import numpy as np

    from actprm_ray.pipeline.stages import ScoreStage

    ckpt = EnsemblePRM.from_backbone(tiny_backbone_dir, PRMConfig(n_heads=2, init_seed=0)).save_pretrained(
        tmp_path / "ckpt")
    stages = {attn: ScoreStage(str(ckpt), attn_implementation=attn) for attn in ("eager", "sdpa")}
    assert {a: s.model.backbone.config._attn_implementation for a, s in stages.items()} == {"eager": "eager",
                                                                                          "sdpa": "sdpa"}
    ids = stages["eager"].model.tokenizer("1+1=2<extra_0>2+2=4<extra_0>")["input_ids"]
    sep = stages["eager"].model.tokenizer.convert_tokens_to_ids("<extra_0>")
    batch = {"id": np.array(["a"], dtype=object), "input_ids": [ids],
             "readout_positions": [[i for i, t in enumerate(ids) if t == sep]], "valid": np.ones(1, dtype=bool)}
    means = [list(s(dict(batch))["step_mean"][0]) for s in stages.values()]
    assert len(means[0]) == 2 and max(abs(a - b) for a, b in zip(*means)) < 1e-5
