"""EnsemblePRM (METHOD §2-§3): µ/σ, separator token, head init, forward read-out, save/load, loading safety."""

from __future__ import annotations

import inspect
import json
import logging
import math
import shutil
import statistics
from dataclasses import asdict

import pytest
import torch
from torch import nn

from actprm_ray.data.collate import collate_encoded
from actprm_ray.data.step_format import DEFAULT_SEP, encode_trajectory
from actprm_ray.model.ensemble_prm import (
    PICKLE_SUFFIXES,
    EnsemblePRM,
    PRMConfig,
    StackedHeads,
    add_separator_token,
    mean_and_std,
    refuse_pickle_files,
)
from actprm_ray.model.scoring import score_encoded, score_trajectories

SEP = DEFAULT_SEP
ROWS = [
    {"question": "Tom has 3 apples and buys 2.", "steps": ["3 + 2 = 5.", "He has 5 apples.", "\\boxed{5}"]},
    {"question": "What is 7 * 6?", "steps": ["7 * 6 = 42."]},
]


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def batch_for(model: EnsemblePRM, rows=ROWS) -> dict:
    enc = [encode_trajectory(model.tokenizer, r["question"], r["steps"], sep=SEP, system_prompt="S") for r in rows]
    return collate_encoded(
        [{"input_ids": e.input_ids, "readout_positions": e.readout_positions} for e in enc],
        pad_id=model.tokenizer.pad_token_id,
    )


# -- µ and σ ----------------------------------------------------------------------------------------------------


def test_mu_is_mean_of_probabilities_not_sigmoid_of_mean_logit():
    logits = torch.tensor([[-2.0], [4.0]])  # 2 heads, 1 step
    mu, sigma = mean_and_std(logits)
    p = [sigmoid(-2.0), sigmoid(4.0)]  # 0.1192, 0.9820
    assert mu.item() == pytest.approx((p[0] + p[1]) / 2, rel=1e-6)  # 0.5506
    assert mu.item() != pytest.approx(sigmoid(1.0), abs=0.1)  # sigmoid of the mean logit would be 0.731
    assert sigma.item() == pytest.approx(abs(p[0] - p[1]) / 2, rel=1e-6)  # population std of two values


def test_sigma_is_population_std():
    logits = torch.tensor([[0.0, 1.0], [1.0, -3.0], [-1.5, 2.0]])  # 3 heads, 2 steps
    mu, sigma = mean_and_std(logits)
    _, sigma_unbiased = mean_and_std(logits, unbiased=True)
    for i in range(2):
        p = [sigmoid(logits[k, i].item()) for k in range(3)]
        assert mu[i].item() == pytest.approx(statistics.fmean(p), rel=1e-6)
        assert sigma[i].item() == pytest.approx(statistics.pstdev(p), rel=1e-5)
        assert sigma_unbiased[i].item() == pytest.approx(statistics.stdev(p), rel=1e-5)


def test_one_head_has_zero_sigma():
    logits = torch.tensor([[0.3, -2.0]])
    for unbiased in (False, True):  # the n-1 estimator would give NaN without the n = 1 rule
        mu, sigma = mean_and_std(logits, unbiased=unbiased)
        assert sigma.tolist() == [0.0, 0.0]
        assert mu[0].item() == pytest.approx(sigmoid(0.3), rel=1e-6)


def test_one_head_model_scores_zero_sigma(tiny_backbone_dir):
    model = EnsemblePRM.from_backbone(tiny_backbone_dir, PRMConfig(n_heads=1))
    out = score_trajectories(model, model.tokenizer, ROWS, sep=SEP, system_prompt="S")
    assert [r["step_std"] for r in out] == [[0.0, 0.0, 0.0], [0.0]]


# -- separator token --------------------------------------------------------------------------------------------


def test_separator_embedding_seeded_from_blank_line(tiny_backbone_dir, tiny_prm):
    from transformers import AutoModel, AutoTokenizer

    raw_tok = AutoTokenizer.from_pretrained(tiny_backbone_dir)
    raw = AutoModel.from_pretrained(tiny_backbone_dir)
    assert SEP not in raw_tok.get_vocab()  # the tiny tokenizer lacks it, so from_backbone had to add it
    raw_emb = raw.get_input_embeddings().weight
    blank_ids = raw_tok("\n\n", add_special_tokens=False)["input_ids"]
    emb = tiny_prm.backbone.get_input_embeddings().weight
    sep_id = tiny_prm.tokenizer.convert_tokens_to_ids(SEP)
    assert sep_id == len(raw_tok)  # appended after the old vocabulary
    assert emb.shape[0] % 16 == 0 and emb.shape[0] >= len(tiny_prm.tokenizer)
    torch.testing.assert_close(emb[sep_id], raw_emb[blank_ids].mean(0), rtol=0, atol=1e-7)
    torch.testing.assert_close(emb[: raw_emb.shape[0]], raw_emb, rtol=0, atol=0)  # old rows untouched


class _FakeTokenizer:
    """"\\n\\n" encodes as two *different* ids (3 and 5), so the seed must be the mean of two rows."""

    def __init__(self):
        self.vocab = {f"t{i}": i for i in range(10)}

    def get_vocab(self):
        return dict(self.vocab)

    def add_special_tokens(self, spec, replace_extra_special_tokens=False):
        for t in spec["additional_special_tokens"]:
            self.vocab.setdefault(t, len(self.vocab))

    def __len__(self):
        return len(self.vocab)

    def __call__(self, text, add_special_tokens=False):
        assert text == "\n\n"
        return {"input_ids": [3, 5]}


class _FakeBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def get_input_embeddings(self):
        return self.emb

    def resize_token_embeddings(self, n, pad_to_multiple_of=1, mean_resizing=True):
        n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
        new = nn.Embedding(n, 4)
        with torch.no_grad():
            new.weight[: self.emb.num_embeddings] = self.emb.weight
        self.emb = new


def test_separator_seed_is_mean_of_multi_token_blank_line():
    tok, backbone = _FakeTokenizer(), _FakeBackbone()
    old = backbone.emb.weight.detach().clone()
    assert add_separator_token(tok, backbone, SEP) is True
    sep_id = tok.get_vocab()[SEP]
    assert sep_id == 10
    expected = (old[3] + old[5]) / 2
    torch.testing.assert_close(backbone.emb.weight[sep_id].detach(), expected)
    torch.testing.assert_close(backbone.emb.weight[:10].detach(), old, rtol=0, atol=0)
    # A tokenizer that already has the separator is left alone.
    before = backbone.emb.weight.detach().clone()
    assert add_separator_token(tok, backbone, SEP) is False
    assert torch.equal(backbone.emb.weight, before)


# -- head initialisation ----------------------------------------------------------------------------------------


def test_head_init_statistics_on_32_heads(tiny_backbone_dir):
    model = EnsemblePRM.from_backbone(tiny_backbone_dir, PRMConfig(n_heads=32, init_seed=0))
    heads = model.heads
    d = model.backbone.config.hidden_size
    assert tuple(heads.w1.shape) == (32, d, 128)
    assert tuple(heads.w2.shape) == (32, 128, 128)
    assert tuple(heads.w3.shape) == (32, 128, 1)
    for w in (heads.w1, heads.w2, heads.w3):
        fan_in = w.shape[1]
        target = 1.0 / (2.0 * math.sqrt(fan_in))
        flat = w.detach().flatten()
        assert flat.std().item() == pytest.approx(target, rel=0.05)
        assert abs(flat.mean().item()) < 5 * target / math.sqrt(flat.numel())
    # Every head gets its own draw at the right scale (w1 has 64 x 128 elements per head).
    per_head = heads.w1.detach().flatten(1).std(1)
    assert torch.allclose(per_head, torch.full_like(per_head, 1.0 / (2.0 * math.sqrt(d))), rtol=0.05)
    for b in (heads.b1, heads.b2, heads.b3):
        assert torch.count_nonzero(b) == 0
    assert all(p.dtype == torch.float32 for p in heads.parameters())


def test_heads_differ_from_each_other():
    heads = StackedHeads(4, 16, 8)
    heads.reset_parameters(seed=0)
    w = heads.w1.detach().flatten(1)
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(w[a], w[b])
            corr = torch.corrcoef(torch.stack([w[a], w[b]]))[0, 1].item()
            assert abs(corr) < 0.3  # independent draws, not copies or shifted copies


def test_init_is_reproducible_from_the_recorded_seed(tiny_backbone_dir):
    torch.manual_seed(1)  # the global RNG must not matter: the heads use their own generator
    a = EnsemblePRM.from_backbone(tiny_backbone_dir, PRMConfig(n_heads=3, init_seed=7))
    torch.manual_seed(2)
    b = EnsemblePRM.from_backbone(tiny_backbone_dir, PRMConfig(n_heads=3, init_seed=7))
    c = EnsemblePRM.from_backbone(tiny_backbone_dir, PRMConfig(n_heads=3, init_seed=8))
    for name, p in a.heads.named_parameters():
        assert torch.equal(p, dict(b.heads.named_parameters())[name])
    assert not torch.equal(a.heads.w1, c.heads.w1)
    ref = StackedHeads(3, a.backbone.config.hidden_size, 128)
    ref.reset_parameters(seed=7)
    assert torch.equal(a.heads.w2, ref.w2)


def test_truncated_init_is_bounded():
    heads = StackedHeads(8, 64, 32)
    heads.reset_parameters(seed=0, kind="truncated")
    bound = 2.0 / (2.0 * math.sqrt(64))  # two standard deviations
    assert heads.w1.abs().max().item() <= bound + 1e-7


def test_anchors_are_frozen_copies_of_fresh_heads(tiny_prm):
    anchors = tiny_prm.anchors()
    assert set(anchors) == {"w1", "b1", "w2", "b2", "w3", "b3"}
    for name, p in tiny_prm.heads.named_parameters():
        assert torch.equal(anchors[name], p)
        assert not anchors[name].requires_grad
        assert anchors[name].data_ptr() != p.data_ptr()  # a copy, not a view
    param_ids = {id(p) for p in tiny_prm.parameters()}
    assert not any(id(a) in param_ids for a in anchors.values())  # never seen by the optimiser


def test_heads_stay_fp32_on_bf16_backbone(tiny_backbone_dir):
    model = EnsemblePRM.from_backbone(tiny_backbone_dir, PRMConfig(n_heads=2), dtype=torch.bfloat16)
    assert next(model.backbone.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.heads.parameters())
    b = batch_for(model)
    with torch.no_grad():
        logits = model(b["input_ids"], b["attention_mask"], b["readout_batch"], b["readout_pos"])
    assert logits.dtype == torch.float32


# -- forward and scoring ----------------------------------------------------------------------------------------


def test_forward_reads_heads_at_separator_positions(tiny_prm):
    b = batch_for(tiny_prm)
    with torch.no_grad():
        logits = tiny_prm(b["input_ids"], b["attention_mask"], b["readout_batch"], b["readout_pos"])
        hidden = tiny_prm.backbone(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        h = tiny_prm.heads
        expected = torch.empty(h.w1.shape[0], len(b["readout_pos"]))
        for k in range(h.w1.shape[0]):  # one MLP at a time: d -> 128 -> ReLU -> 128 -> ReLU -> 1
            for j, (row, pos) in enumerate(zip(b["readout_batch"].tolist(), b["readout_pos"].tolist())):
                x = hidden[row, pos]
                x = torch.relu(x @ h.w1[k] + h.b1[k, 0])
                x = torch.relu(x @ h.w2[k] + h.b2[k, 0])
                expected[k, j] = (x @ h.w3[k] + h.b3[k, 0]).squeeze()
    assert logits.shape == (8, 4)  # 8 heads x (3 + 1) separators
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    sep_id = tiny_prm.tokenizer.convert_tokens_to_ids(SEP)
    assert all(b["input_ids"][r, p] == sep_id for r, p in zip(b["readout_batch"], b["readout_pos"]))


def test_score_trajectories_shapes_order_and_padding(tiny_prm):
    one_by_one = [score_trajectories(tiny_prm, tiny_prm.tokenizer, [r], sep=SEP, system_prompt="S")[0] for r in ROWS]
    together = score_trajectories(tiny_prm, tiny_prm.tokenizer, ROWS[::-1], sep=SEP, system_prompt="S", batch_size=2)
    together = together[::-1]  # results come back in input order
    for single, batched, row in zip(one_by_one, together, ROWS):
        assert len(single["step_mean"]) == len(single["step_std"]) == len(row["steps"])
        # Right padding next to a longer row must not change a row's scores.
        assert batched["step_mean"] == pytest.approx(single["step_mean"], abs=1e-5)
        assert batched["step_std"] == pytest.approx(single["step_std"], abs=1e-5)
        assert all(0.0 < m < 1.0 for m in single["step_mean"])
        assert all(s >= 0.0 for s in single["step_std"])


class _WidthModel:
    """A stand-in PRM for score_encoded: µ = the batch's padded width, σ = the read-out position; records widths."""

    class tokenizer:  # noqa: N801 -- only the pad id is read
        pad_token_id = None

    def __init__(self):
        self.widths = []

    def eval(self):
        return self

    def score(self, batch):
        width = batch["input_ids"].shape[1]
        self.widths.append(width)
        return torch.full(batch["readout_pos"].shape, float(width)), batch["readout_pos"].float()


def test_score_encoded_runs_longest_batches_first_and_answers_in_input_order():
    lengths = [2, 9, 5, 7, 1]
    encoded = [{"input_ids": [1] * n, "readout_positions": [n - 1]} for n in lengths]
    model, done = _WidthModel(), []
    out = score_encoded(model, encoded, batch_size=2, on_batch=done.append)
    assert model.widths == [9, 5, 1]  # batches [9, 7], [5, 2], [1]: the largest first (an OOM fails at once)
    assert done == [2, 2, 1]  # rows per forward pass, for progress reports
    assert [r["step_mean"] for r in out] == [[5.0], [9.0], [5.0], [9.0], [1.0]]
    assert [r["step_std"] for r in out] == [[n - 1.0] for n in lengths]
    # Packed into lines of <= 12 tokens, in the same order: [9], [7, 5], [2, 1].
    model = _WidthModel()
    out = score_encoded(model, encoded, pack_tokens=12)
    assert model.widths == [9, 12, 3]
    assert [r["step_mean"] for r in out] == [[3.0], [9.0], [12.0], [12.0], [3.0]]


def test_separator_in_question_adds_no_score(tiny_prm):
    out = score_trajectories(tiny_prm, tiny_prm.tokenizer, [{"question": "a <extra_0> b", "steps": ["x", "y"]}],
                             sep=SEP, system_prompt="S")
    assert len(out[0]["step_mean"]) == 2


def test_other_decoder_architecture(tmp_path, tiny_backbone_dir):
    """Backbone-agnostic: a GPT-2 decoder (learned positions, other module names) works the same way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    tok = AutoTokenizer.from_pretrained(tiny_backbone_dir)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=256,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = EnsemblePRM.from_backbone(tmp_path, PRMConfig(n_heads=2))
    assert type(model.backbone).__name__ == "GPT2Model"
    assert tuple(model.heads.w1.shape) == (2, 32, 128)
    out = score_trajectories(model, model.tokenizer, ROWS, sep=SEP, system_prompt="S")
    assert [len(r["step_mean"]) for r in out] == [3, 1]


# -- save / load ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_checkpoint(tiny_backbone_dir, tmp_path_factory):
    """A trained-looking model (heads moved away from their anchors) and its checkpoint directory."""
    model = EnsemblePRM.from_backbone(tiny_backbone_dir, PRMConfig(n_heads=4, init_seed=5, system_prompt="S"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.eval()
    return model, model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "prm")


def test_round_trip_is_bit_identical(saved_checkpoint):
    model, ckpt = saved_checkpoint
    loaded = EnsemblePRM.from_pretrained(ckpt).eval()
    assert asdict(loaded.config) == asdict(model.config)
    assert loaded.tokenizer.convert_tokens_to_ids(SEP) == model.tokenizer.convert_tokens_to_ids(SEP)
    b_orig, b_loaded = batch_for(model), batch_for(loaded)
    for key in b_orig:
        assert torch.equal(b_orig[key], b_loaded[key]), key  # the reloaded tokenizer encodes identically
    with torch.no_grad():
        mu0, sd0 = model.score(b_orig)
        mu1, sd1 = loaded.score(b_loaded)
    assert torch.equal(mu0, mu1) and torch.equal(sd0, sd1)
    assert sd0.abs().sum() > 0  # a real spread, so the σ comparison means something


def test_anchors_survive_the_round_trip(saved_checkpoint):
    model, ckpt = saved_checkpoint
    loaded = EnsemblePRM.from_pretrained(ckpt)
    for name, anchor in model.anchors().items():
        assert torch.equal(loaded.anchors()[name], anchor)
        assert torch.equal(dict(loaded.heads.named_parameters())[name], dict(model.heads.named_parameters())[name])
    # The anchors are the fresh heads, not the moved ones: they must still differ after loading.
    assert not torch.equal(loaded.anchors()["w1"], loaded.heads.w1)


def test_checkpoint_layout_is_safetensors_with_metadata(saved_checkpoint):
    _, ckpt = saved_checkpoint
    files = [p for p in ckpt.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES]
    assert (ckpt / "heads.safetensors").is_file()
    assert list((ckpt / "backbone").glob("*.safetensors"))
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["actprm"]["n_heads"] == 4
    assert meta["actprm"]["sep"] == SEP
    assert meta["actprm"]["init_seed"] == 5
    assert meta["actprm"]["thresholds"] == {"delta_pred": 0.95, "delta_std": 0.005, "step_threshold": 0.5}
    assert meta["backbone_config"]["hidden_size"] == 64


@pytest.mark.parametrize("where", ["pytorch_model.bin", "backbone/pytorch_model.bin", "extra/heads.pt"])
def test_pickle_files_are_refused(saved_checkpoint, tmp_path, where):
    _, ckpt = saved_checkpoint
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    bad = copy / where
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        EnsemblePRM.from_pretrained(copy)


def test_refuse_pickle_files_accepts_clean_dir(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    refuse_pickle_files(tmp_path)  # no error
    (tmp_path / "x.pkl").write_bytes(b"")
    with pytest.raises(ValueError, match=r"x\.pkl"):
        refuse_pickle_files(tmp_path)


def test_from_pretrained_rejects_non_checkpoints(tmp_path, tiny_backbone_dir):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        EnsemblePRM.from_pretrained(tmp_path)
    # A plain HF backbone directory has a config.json but no "actprm" section.
    with pytest.raises(ValueError, match="actprm"):
        EnsemblePRM.from_pretrained(tiny_backbone_dir)


def test_load_head_state_rejects_mismatched_keys(tiny_backbone_dir):
    model = EnsemblePRM.from_backbone(tiny_backbone_dir, PRMConfig(n_heads=2))
    state = model.head_state()
    del state["anchor_w1"]
    with pytest.raises(ValueError, match="anchor_w1"):
        model.load_head_state(state)


# -- remote code ------------------------------------------------------------------------------------------------


def test_trust_remote_code_is_off_by_default():
    for fn in (EnsemblePRM.from_backbone, EnsemblePRM.from_pretrained):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False


def test_loaders_pass_trust_remote_code_false(monkeypatch, saved_checkpoint, tiny_backbone_dir, caplog):
    import transformers

    seen = []

    def spy(cls):
        original = cls.from_pretrained

        def wrapped(*args, **kwargs):
            seen.append((cls.__name__, kwargs.get("trust_remote_code", "missing")))
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", wrapped)

    spy(transformers.AutoModel)
    spy(transformers.AutoTokenizer)
    EnsemblePRM.from_backbone(tiny_backbone_dir, PRMConfig(n_heads=1))
    EnsemblePRM.from_pretrained(saved_checkpoint[1])
    assert sorted(seen) == [("AutoModel", False)] * 2 + [("AutoTokenizer", False)] * 2
    assert "trust_remote_code" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="actprm_ray.model.ensemble_prm"):
        EnsemblePRM.from_backbone(tiny_backbone_dir, PRMConfig(n_heads=1), trust_remote_code=True)
    assert "trust_remote_code=True" in caplog.text


def test_prm_config_takes_the_config_trees_defaults_and_a_runs_settings():
    from actprm_ray.config import load_config
    from actprm_ray.model.ensemble_prm import PRMConfig

    # One set of defaults: a bare PRMConfig is what the default config tree builds.
    assert PRMConfig() == PRMConfig.from_config(load_config())
    cfg = load_config(overrides=["model.n_heads=3", "model.sep=<step>", "model.system_prompt=Be brief.",
                                 "selection.delta_std=0.01", "selection.unbiased_std=true", "model.init=truncated"])
    prm = PRMConfig.from_config(cfg)
    assert (prm.n_heads, prm.sep, prm.system_prompt, prm.init, prm.unbiased_std) == (3, "<step>", "Be brief.",
                                                                                     "truncated", True)
    assert prm.thresholds == {"delta_pred": 0.95, "delta_std": 0.01, "step_threshold": 0.5}
