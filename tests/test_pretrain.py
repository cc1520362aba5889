"""Pretraining the tiny backbone (actprm_ray.model.pretrain) at CI size, and the shared training step's optimiser."""

from __future__ import annotations

import json

import pytest

from actprm_ray.model.pretrain import PRETRAIN_SEED, PretrainConfig, pretrain_backbone, result_token_mask


@pytest.fixture(scope="module")
def small_pretrained(tmp_path_factory):
    cfg = PretrainConfig(out_dir=str(tmp_path_factory.mktemp("pt") / "tiny_math"), rows=1536, heldout_rows=64,
                         warmup_steps=5, log_every=0)
    return cfg, pretrain_backbone(cfg)


def test_result_digits_are_the_number_after_each_equals_sign(tiny_backbone_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_backbone_dir)
    text = "She buys 5 more: 24 + 5 = 29. Then 29 - 13 = 16 left."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    marked = "".join(tok.convert_tokens_to_string([t]) for t, m in zip(tok.convert_ids_to_tokens(ids),
                                                                        result_token_mask(tok, ids)) if m)
    assert marked == "2916"


def test_pretraining_learns_and_writes_a_loadable_backbone(small_pretrained):
    from actprm_ray.model.ensemble_prm import EnsemblePRM, PRMConfig

    cfg, out = small_pretrained
    record = json.loads((out / "pretrain.json").read_text())
    before, after = record["heldout_before"], record["heldout_after"]
    # 48 steps on ~380K tokens: far from the full run's 0.11, but the held-out loss must drop by a lot.
    assert after["loss"] < before["loss"] - 1.0
    assert after["token_accuracy"] > before["token_accuracy"] + 0.2
    assert record["config"]["data_seed"] == PRETRAIN_SEED and (out / "model.safetensors").is_file()
    # The separator is learned in pretraining, so the PRM does not add (and re-seed) it.
    prm = EnsemblePRM.from_backbone(out, PRMConfig(n_heads=2, sep=cfg.sep))
    assert cfg.sep in prm.tokenizer.get_vocab() and not any(out.glob("*.tmp"))


def test_a_matching_directory_is_reused_and_a_different_one_refused(small_pretrained):
    import dataclasses

    cfg, out = small_pretrained
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert pretrain_backbone(cfg) == out and (out / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="different backbone"):
        pretrain_backbone(dataclasses.replace(cfg, lr=1e-4))


def test_pretraining_text_never_comes_from_a_pool_or_test_seed():
    # Pools use small data seeds (run.seed, data.synthetic_seed), tests 10,000 and the validation split 20,000.
    assert PRETRAIN_SEED > 1_000_000


def test_heads_get_their_own_learning_rate(tiny_prm):
    from actprm_ray.config import TrainConfig
    from actprm_ray.train.step import build_optimizer

    opt, _ = build_optimizer(tiny_prm, tiny_prm, TrainConfig(lr=1e-4, head_lr=3e-3, warmup_steps=1))
    by_lr = {g["lr"]: sum(p.numel() for p in g["params"]) for g in opt.param_groups}
    heads = sum(p.numel() for p in tiny_prm.heads.parameters())
    assert by_lr == {1e-4: sum(p.numel() for p in tiny_prm.parameters() if p.requires_grad) - heads, 3e-3: heads}
    opt, _ = build_optimizer(tiny_prm, tiny_prm, TrainConfig(lr=1e-4, warmup_steps=1))
    assert {g["lr"] for g in opt.param_groups} == {1e-4}
