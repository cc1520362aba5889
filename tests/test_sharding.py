"""train/sharding.load_sharded in two real processes on gloo (no Ray): rank 0 reads the checkpoint, rank 1 builds a
meta-device skeleton, and after sharding both hold exactly the checkpoint's weights."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, init_dir: str, out: str, gradient_checkpointing: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from actprm_ray.model import ensemble_prm
        from actprm_ray.train import sharding

        if rank > 0:
            def refuse(*args, **kwargs):
                raise AssertionError(f"rank {rank} read the backbone's weights")

            ensemble_prm._load_backbone = refuse  # only rank 0 may read weights
        model = sharding.load_sharded(init_dir, torch.device("cpu"), dtype=torch.float32, attn_implementation=None,
                                      gradient_checkpointing=gradient_checkpointing)
        assert sharding.is_sharded(model) and not any(p.is_meta for p in model.parameters())
        assert not any(b.is_meta for b in model.buffers())
        state = sharding.gather_state(model, model, "full")  # a collective: the shards gathered on rank 0
        buffers = {k: v.clone() for k, v in model.named_buffers()}  # computed ones too (rotary), per rank
        heads = {k: v.detach().clone() for k, v in model.heads.named_parameters()}  # replicated on every rank
        torch.save({"state": state, "buffers": buffers, "heads": heads}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_load_sharded_reads_on_rank_0_and_every_rank_gets_the_checkpoint(tiny_backbone_dir, tmp_path,
                                                                         gradient_checkpointing):
    from actprm_ray.model.ensemble_prm import EnsemblePRM, PRMConfig

    init_dir = EnsemblePRM.from_backbone(tiny_backbone_dir, PRMConfig(n_heads=4, init_seed=3)).save_pretrained(
        tmp_path / "init")
    mp.start_processes(_worker, args=(_free_port(), str(init_dir), str(tmp_path), gradient_checkpointing),
                       nprocs=WORLD, start_method="spawn")
    ref = EnsemblePRM.from_pretrained(init_dir)
    ref_state = ref.state_dict()
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert got[1]["state"] is None  # gathered on rank 0 only
    assert set(got[0]["state"]) == set(ref_state)
    for k, v in ref_state.items():
        assert torch.equal(got[0]["state"][k], v), k
    ref_buffers = dict(ref.named_buffers())
    for r in range(WORLD):
        assert set(got[r]["buffers"]) == set(ref_buffers)
        for k, v in ref_buffers.items():  # anchors from the broadcast; rotary frequencies computed on each rank
            assert torch.equal(got[r]["buffers"][k], v), (r, k)
        for k, v in ref.heads.named_parameters():
            assert torch.equal(got[r]["heads"][k], v), (r, k)
