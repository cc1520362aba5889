"""`jobs/active_train.py --dry_run`: the 7B profile checked without a GPU, weights or Ray (issue 16 item 6).

The CLI on conf/cluster_7b.yaml passes and prints the estimate; an override that cannot fit exits 1 naming what
does not fit and what to change; the numbers are checked against a real small model built on the CPU: its
parameters, gradients and AdamW state after one optimizer step, and the bytes autograd saves for backward.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actprm_ray.config import load_config
from actprm_ray.model import memory as mem

REPO = Path(__file__).resolve().parents[1]
CLUSTER_7B = REPO / "conf" / "cluster_7b.yaml"


def _job(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(REPO / "jobs" / "active_train.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cluster_7b_dry_run_passes_and_prints_the_estimate(tmp_path):
    proc = _job("--config", str(CLUSTER_7B), "--dry_run", f"run.output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "ScalingConfig(num_workers=8, use_gpu=True, resources_per_worker={'CPU': 4.0, 'GPU': 1.0})" in out
    for stage in ("canonicalize", "score", "select", "label", "sink TorchTrainer x8"):
        assert stage in out, stage
    assert "backbone Qwen2.5-Math-7B-Instruct: 7,070,619,136 params without the LM head" in out
    for role in ("trainer: 8 workers x 1 GPU (fsdp", "scorer: 2 actors x 1 GPU", "judge: 2 engines x TP 4"):
        assert role in out, role
    assert "DOES NOT FIT" not in out and "dry run OK" in out
    assert "Started a local Ray instance" not in out + proc.stderr
    report = json.loads((tmp_path / "actprm_7b" / "dry_run.json").read_text())
    assert (tmp_path / "actprm_7b" / "config.yaml").is_file()
    assert report["fits"] and [e["role"] for e in report["estimates"]] == ["trainer", "scorer", "judge"]
    assert report["scaling_config"]["num_workers"] == 8 and report["gpus"]["max"] == 18 == report["gpus"]["cluster"]
    trainer = report["estimates"][0]
    assert 10 < trainer["required_gib"] < trainer["budget_gib"] == 79.6


def test_override_that_cannot_fit_exits_nonzero_and_says_what_to_change(tmp_path):
    # DDP keeps full weights, gradients, buckets and AdamW moments of a 7B model on every GPU: ~89 GiB of 79.6.
    proc = _job("--config", str(CLUSTER_7B), "--dry_run", "train.parallel_strategy=ddp", f"run.output_dir={tmp_path}")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "DOES NOT FIT" in proc.stdout
    err = proc.stderr
    assert "does not fit the hardware it names" in err
    assert "trainer (8 workers x 1 GPU (ddp" in err and "per GPU, the GPU has 79.6" in err
    assert "To fit, set train.parallel_strategy=fsdp" in err
    assert "scorer" not in err and "judge" not in err  # only what does not fit is named


def test_tiny_gpus_and_too_few_gpus_are_named(tmp_path):
    from actprm_ray.drivers.dry_run import dry_run

    cfg = load_config(CLUSTER_7B, [f"run.output_dir={tmp_path}", "cluster.gpu_memory_gb=24", "cluster.num_gpus=12"])
    import ray

    ray_before = ray.is_initialized()  # an earlier test's session fixture may have started Ray in this process
    printed = io.StringIO()
    assert dry_run(cfg, str(CLUSTER_7B), out=printed) == 1
    assert printed.getvalue().count("DOES NOT FIT") == 2
    report = json.loads((tmp_path / "actprm_7b" / "dry_run.json").read_text())
    fits = {e["role"]: e["fits"] for e in report["estimates"]}
    assert fits == {"trainer": False, "scorer": False, "judge": True}
    problems = "\n".join(report["problems"])
    assert "train.micro_batch_size=4 train.grad_accum=2" in problems  # same global batch
    assert "train.publish=heads" in problems
    assert "needs at least 13" in problems and "cluster.num_gpus=12" in problems
    assert ray.is_initialized() == ray_before  # the plan and the ScalingConfig were built without starting Ray


def test_table_entries_match_the_published_parameter_counts():
    """The meta-device counts of the built-in architectures against published counts (model cards) or by hand."""
    assert mem.resolve_arch("Qwen/Qwen2.5-7B-Instruct").params_causal_lm == 7_615_616_512  # "7.61B"
    qwq_layer = (5120 * 5120 + 5120) + 2 * (5120 * 1024 + 1024) + 5120 * 5120 + 3 * 5120 * 27648 + 2 * 5120
    assert mem.resolve_arch("/models/QwQ-32B").params_causal_lm == 64 * qwq_layer + 2 * 152064 * 5120 + 5120
    assert mem.resolve_arch("smollm2-135m").params_causal_lm == 134_515_008  # tied embeddings counted once
    # Gemma 3: head_dim 256 is not hidden / heads (640 / 4), and q/k have their own norms; four norms a layer.
    gemma_layer = 640 * 1024 + 2 * 640 * 256 + 1024 * 640 + 2 * 256 + 3 * 640 * 2048 + 4 * 640
    gemma = mem.resolve_arch("gemma3-270m")
    assert gemma.head_dim == 256 and gemma.params_causal_lm == 18 * gemma_layer + 262144 * 640 + 640
    # = 268,098,176; tests/test_real_models.py checks it against the real model (extended tier).


def test_unknown_backbone_fails_with_what_to_do():
    with pytest.raises(mem.UnknownArchitecture, match="Copy the model's config.json"):
        mem.resolve_arch("/nowhere/SomeModel-3B")


# -- the numbers against a real model --------------------------------------------------------------------------
def _real_prm(config, dtype, n_heads=4, head_hidden=16):
    from transformers import AutoModel

    from actprm_ray.model.ensemble_prm import EnsemblePRM, PRMConfig

    torch.manual_seed(0)
    model = EnsemblePRM(AutoModel.from_config(config, dtype=dtype), PRMConfig(n_heads=n_heads, head_hidden=head_hidden))
    model.reset_heads()
    return model


def _batch(b: int, s: int, vocab: int):
    ids = torch.randint(0, vocab, (b, s))
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, s // 2:] = 0  # one padded row: the mask the trainer's collate produces
    return ids, mask, torch.arange(b), torch.full((b,), 5)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_trainer_state_matches_a_real_optimizer_step(tmp_path):
    """Weights, anchors, gradients and AdamW moments of a real bf16 PRM after one step, byte for byte; the
    architecture comes from a local config.json, built on the meta device."""
    from transformers import Qwen2Config

    from actprm_ray.config import TrainConfig
    from actprm_ray.train.step import build_optimizer

    config = Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    config.save_pretrained(tmp_path / "MyModel-3B")
    arch = mem.resolve_arch(str(tmp_path / "MyModel-3B"))
    model = _real_prm(config, torch.bfloat16)
    optimizer, _ = build_optimizer(model, model, TrainConfig())
    ids, mask, rb, rp = _batch(2, 32, 512)
    model(ids, mask, rb, rp).float().square().mean().backward()
    optimizer.step()

    parts = {p.name: p.bytes for p in mem.trainer_estimate(
        arch, dtype="bfloat16", n_heads=4, head_hidden=16, micro_batch=2, max_length=32, checkpointing=False,
        attn="sdpa", strategy="ddp", world=1)}
    moments = [v for s in optimizer.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert parts["weights"] == _nbytes(model.parameters())
    assert parts["anchors"] == _nbytes(model.anchors().values())
    assert parts["gradients"] == _nbytes(p.grad for p in model.parameters())
    assert parts["AdamW moments"] == _nbytes(moments)
    assert arch.params_layer == sum(p.numel() for p in model.backbone.layers[0].parameters())
    assert arch.params_backbone == sum(p.numel() for p in model.backbone.parameters())
    # The scorer holds the same weights plus the anchors.
    scorer = {p.name: p.bytes for p in mem.scorer_estimate(arch, dtype="bfloat16", n_heads=4, head_hidden=16,
                                                             batch=2, max_length=32, pack_tokens=0, attn="sdpa",
                                                             publish="full")}
    assert scorer["weights"] == _nbytes(model.parameters()) + _nbytes(model.anchors().values())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_formula_matches_the_bytes_autograd_saves(dtype, checkpointing):
    """Every tensor saved for backward (distinct storages, parameters excluded) in one training forward of a
    small Qwen2 PRM, against L layers + the tail of the formula (the estimate adds the backward working set)."""
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = _real_prm(config, getattr(torch, dtype)).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    arch = mem.Arch(name="t", source="test", hidden=128, intermediate=384, layers=3, heads=4, kv_heads=2, head_dim=32,
                    vocab=512, max_positions=0, params_backbone=0, params_layer=0, params_causal_lm=0)
    b, s = 4, 128
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*_batch(b, s, 512))
    e = mem.DTYPE_BYTES[dtype]
    tail = (4 + e) * 128 + 4 + 8
    per_layer = e * 128 if checkpointing else mem.layer_activation_bytes(arch, e, s)
    expected = b * s * (3 * per_layer + tail)
    measured = sum(saved.values())
    assert abs(measured - expected) / expected < 0.02, (measured, expected)  # measured: within 0.6%
    # And the estimate is that plus the backward working set: never below what autograd keeps.
    assert mem.train_activation_bytes(arch, e, b * s, s, checkpointing=checkpointing, attn="sdpa") > measured


# benchmarks/gpu_suite.sh's loop: trainer, scorer and a TP-1 vLLM judge share one 80 GiB card through fractional GPUs.
ONE_GPU = ["model.dtype=bfloat16", "train.use_gpu=true", "train.gpus_per_worker=0.3", "pipeline.score_num_gpus=0.2",
           "pipeline.label_num_gpus=0.4", "labeler.judge.dtype=bfloat16", "cluster.num_gpus=1",
           "cluster.gpu_memory_gb=80"]


def test_one_gpu_shared_by_trainer_scorer_and_judge(capsys):
    from actprm_ray.drivers.dry_run import dry_run

    real_small = REPO / "conf" / "real_small.yaml"
    fits = load_config(real_small, [*ONE_GPU, "labeler.judge.gpu_memory_utilization=0.35"])
    printed = io.StringIO()
    assert dry_run(fits, str(real_small), out=printed) == 0, printed.getvalue()
    # vLLM reserves its utilization of the whole card: 0.5 x 80 = 40 GiB does not fit the judge's 0.4 share (32 GiB).
    too_big = load_config(real_small, [*ONE_GPU, "labeler.judge.gpu_memory_utilization=0.5"])
    printed = io.StringIO()
    assert dry_run(too_big, str(real_small), out=printed) == 1
    assert "40.00   gpu_memory_utilization 0.5 x 80.0 GiB" in printed.getvalue()
    assert "GPU memory                              32.00   DOES NOT FIT" in printed.getvalue()
    verdict = capsys.readouterr().err
    assert "needs ~40.0 GiB per GPU, the GPU has 32" in verdict
    assert "lower labeler.judge.gpu_memory_utilization to <= 0.4" in verdict
