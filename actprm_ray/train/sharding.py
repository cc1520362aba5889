"""Sharded training (train.parallel_strategy=fsdp) with torch's FSDP2, Ray-free; on CPU (gloo) and GPU (nccl).

Ray Train's `prepare_model(parallel_strategy="fsdp")` wraps FSDP1 and refuses CPU, so the worker shards itself:

    every decoder layer (the backbone's `_no_split_modules`)  -> its own FSDP2 group (bf16/fp32 backbone params)
    the root EnsemblePRM (embeddings, final norm)             -> the root group
    the ensemble heads                                        -> NOT sharded: replicated, grads averaged here

The heads stay plain replicated fp32 tensors on every rank (~60 MB at n=32, d=3584) because the anchor
regulariser (loss.py) reads them by name outside the model's forward: a sharded head would be a DTensor shard
there, or an unsharded view whose gradient could arrive after FSDP's reduce-scatter. A reduce-scatter group also
needs one gradient dtype, and the heads are fp32 next to a bf16 backbone.

Loading (load_sharded): rank 0 reads the checkpoint; every other rank builds the model on the meta device and
receives its shards from rank 0 after sharding, so a node with 8 ranks holds one whole copy of a 7B model, not 8.

Everything here also takes a DDP (or single-process) model, where it does the plain thing, so the training loop
has one code path: `reduce_replicated_grads` (no-op), `clip_grad_norm` (the usual global norm), `gather_state`
(rank 0's own state dict), `local_optimizer_state` / `load_local_optimizer_state` (the optimizer's own).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from actprm_ray.model.ensemble_prm import EnsemblePRM


def shard(model: EnsemblePRM, device: torch.device) -> EnsemblePRM:
    """FSDP2 over the default process group: one group per decoder layer, the rest in the root; heads replicated.

    Returns the same object (fully_shard changes its class in place); call after enable_gradient_checkpointing.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)  # the mesh (and NCCL) use the current device
    if not any(p.is_meta for p in model.parameters()):  # a skeleton is materialised after sharding (load_sharded)
        model.to(device)  # whole model first: ignored (replicated) params are not moved by fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    layer_classes = set(getattr(model.backbone, "_no_split_modules", None) or ())
    for module in model.backbone.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=set(model.heads.parameters()))
    return model


def load_sharded(directory, device: torch.device, *, dtype: torch.dtype, attn_implementation: str | None,
                 gradient_checkpointing: bool) -> EnsemblePRM:
    """The sharded model of checkpoint `directory`, read by rank 0 alone: the other ranks build a skeleton on the
    meta device (EnsemblePRM.skeleton), every rank shards, and rank 0 sends each rank its shards (and the replicated
    heads and anchors). A rank never holds the whole model unless it is rank 0: with a 7B backbone and 8 ranks on
    a node that is 7 copies (~200 GB of fp32) the node's memory does not have to hold. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation)
    if _rank() == 0:
        model = EnsemblePRM.from_pretrained(directory, **kwargs)
        full = model.state_dict()  # keeps the whole tensors alive through sharding, for the broadcast
    else:
        model, full = EnsemblePRM.skeleton(directory, **kwargs), {}
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    computed = {name: b for name, b in model.named_buffers() if not b.is_meta}  # not in the state dict (rotary)
    shard(model, device)
    model.to_empty(device=device)  # every rank alike: rank 0's values come back with the broadcast
    emptied = dict(model.named_buffers())
    with torch.no_grad():
        for name, buf in computed.items():
            emptied[name].copy_(buf)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def reduce_replicated_grads(model: nn.Module) -> None:
    """Average the replicated (non-DTensor) parameters' gradients over ranks; FSDP reduced the sharded ones.

    A no-op for DDP (it reduced everything) and for one process. One flat all-reduce (gloo has no AVG: sum / world).
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1 and is_sharded(model)):
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None and not isinstance(p, DTensor)]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip all gradients to a global L2 norm of `max_norm`; return the norm before clipping (same on every rank).

    Sharded (DTensor) gradients add their local shards' squares, summed over ranks; replicated ones (heads, or
    everything under DDP) count once. torch's clip_grad_norm_ cannot mix DTensor and plain gradients in one call.
    """
    if not is_sharded(model):  # DDP / one process: torch's own (the numbers every unsharded run had before)
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    sharded = [g.to_local() for g in grads if isinstance(g, DTensor)]
    device = grads[0].device if grads else torch.device("cpu")
    sq_sharded = torch.zeros((), dtype=torch.float32, device=device)
    for g in sharded:
        sq_sharded += g.float().pow(2).sum()
    if dist.is_initialized():
        dist.all_reduce(sq_sharded, op=dist.ReduceOp.SUM)
    sq_replicated = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        if not isinstance(g, DTensor):
            sq_replicated += g.float().pow(2).sum()
    total = float((sq_sharded + sq_replicated).sqrt())
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


def gather_state(model: nn.Module, core: EnsemblePRM, what: str = "full") -> dict[str, torch.Tensor] | None:
    """The model's state ("full") or heads + anchors ("heads"), complete and on CPU, on rank 0; None elsewhere.

    Sharded, "full" is a collective (every rank must call it): the backbone is gathered layer by layer into rank 0's
    CPU memory. The heads are replicated, so "heads" needs no communication.
    """
    if what == "full" and is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().contiguous() for k, v in state.items()} if _rank() == 0 else None
    return core.publishable_state(what) if _rank() == 0 else None


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """This rank's optimizer state dict with DTensor shards as plain local tensors (torch.load(weights_only) reads
    it). Restore it with the same world size and sharding (load_local_optimizer_state)."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: v.to_local() if isinstance(v, DTensor) else v for k, v in s.items()}
                      for i, s in state["state"].items()}
    return state


def load_local_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of local_optimizer_state: re-wrap each shard as a DTensor laid out like its (sharded) parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, s in state["state"].items():
        p = params[int(i)]
        if not isinstance(p, DTensor):
            continue
        for k, v in s.items():
            if torch.is_tensor(v) and not isinstance(v, DTensor) and v.dim() == p.dim():  # exp_avg etc., not step
                s[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False,
                                          shape=p.shape, stride=p.stride())
    optimizer.load_state_dict(state)
