"""One PRM training step, Ray-free: the optimiser, the micro-step (forward, inline selection, loss, backward) and
the optimiser step. The Ray Train worker (train/loop.py) and the pool-based simulation of the label-efficiency
benchmark both call these, so there is one training loop body, not two.

Rows are dicts with `input_ids`, `readout_positions` and `hard_labels` (the judge's labels); with inline
selection (METHOD §12, Algorithm 1) the oracle's `oracle_first_error_step` stands in for the label and the
selection rule runs here, on this forward pass. A row flagged `_dummy` carries zero weight (uneven DDP ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actprm_ray.config import Config, TrainConfig
from actprm_ray.data.collate import collate_encoded
from actprm_ray.loss import actprm_loss
from actprm_ray.model.ensemble_prm import EnsemblePRM, mean_and_std
from actprm_ray.select import is_uncertain, pseudo_labels
from actprm_ray.train.sharding import clip_grad_norm, reduce_replicated_grads


def lr_lambda(warmup: int, total: int):
    """Linear warm-up to the peak, then linear decay to 0 at `total` (nanoGPT-style pure schedule)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def build_optimizer(model: torch.nn.Module, core: EnsemblePRM, t: TrainConfig):
    """AdamW; with `head_lr` set, the heads get their own peak learning rate (the backbone keeps `lr`)."""
    head_ids = {id(p) for p in core.heads.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    heads = [p for p in params if id(p) in head_ids]
    backbone = [p for p in params if id(p) not in head_ids]
    # One group unless head_lr is set: checkpoints written before head_lr existed keep loading.
    groups = ([{"params": params, "lr": t.lr}] if t.head_lr is None else
              [g for g in ({"params": backbone, "lr": t.lr}, {"params": heads, "lr": t.head_lr}) if g["params"]])
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=t.weight_decay)
    total = t.total_steps or max(t.warmup_steps + 1, 10_000)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup_steps, total))
    return optimizer, scheduler


def truncate_to_labels(input_ids, positions, hard_labels) -> tuple[list[int], list[int]]:
    """Steps after the first error are dropped (METHOD §1): cut the ids right after the last labelled SEP."""
    positions = list(positions)[: len(hard_labels)]
    return list(input_ids)[: positions[-1] + 1], positions


def inline_labels(k: int, m: int) -> list[int]:
    """The oracle's labels for inline selection: k < 0 = every step correct, else k ones then the error."""
    return [1] * m if k < 0 else [1] * k + [0]


@dataclass
class MicroStep:
    loss: float
    selected: list[bool]  # per row: trained on (False for dummies and, inline, for rows trusted by the ensemble)
    empty_selection: bool
    # Inline selection's trusted rows: their pseudo-label against the oracle's (1/0), as the scorer's trusted rows
    # get; -1 for every other row.
    pseudo_label_correct: list[int] | None = None


def micro_step(model: torch.nn.Module, core: EnsemblePRM, rows: list[dict], cfg: Config,
               device: torch.device | str = "cpu", loss_scale: float = 1.0, replayed: bool = False) -> MicroStep:
    """Forward, select (inline only), loss, backward (scaled by loss_scale, e.g. 1 / grad_accum). Replayed rows
    were selected once already and carry the labels they were trained on: every one is trained again."""
    sel = cfg.selection
    inline = sel.inline and not replayed
    batch_rows = []
    for r in rows:
        labels = list(r["hard_labels"]) if len(r.get("hard_labels", [])) else None
        if inline:
            labels = inline_labels(int(r["oracle_first_error_step"]), len(r["readout_positions"]))
        ids, pos = truncate_to_labels(r["input_ids"], r["readout_positions"], labels)
        batch_rows.append({"input_ids": ids, "readout_positions": pos, "labels": labels})
    pad = core.tokenizer.pad_token_id or 0
    batch = {k: v.to(device) for k, v in collate_encoded(batch_rows, pad).items()}
    step_row = batch["readout_batch"]
    model.train()
    logits = model(batch["input_ids"], batch["attention_mask"], batch["readout_batch"], batch["readout_pos"])
    selected = torch.ones(len(rows), dtype=torch.bool, device=device)
    pseudo_correct = [-1] * len(rows)
    if inline:
        with torch.no_grad():
            mu, sigma = mean_and_std(logits.detach(), core.config.unbiased_std)
    for b, r in enumerate(rows):
        if r.get("_dummy"):
            selected[b] = False
        elif inline:  # a paid (judge) label is always trained; only inline selection decides here
            m, s = mu[step_row == b].tolist(), sigma[step_row == b].tolist()
            uncertain = is_uncertain(m, s, delta_pred=sel.delta_pred, delta_std=sel.delta_std,
                                     step_threshold=sel.step_threshold)
            selected[b] = uncertain if sel.mode == "active" else sel.mode == "all"
            if not selected[b]:
                pseudo_correct[b] = int(pseudo_labels(m, sel.step_threshold) == batch_rows[b]["labels"])
    keep = None
    if cfg.loss.p_keep < 1.0:
        keep = torch.rand(logits.shape[0], len(rows), device=device) < cfg.loss.p_keep
    loss, stats = actprm_loss(
        logits, batch["labels"], step_row, selected, dict(core.heads.named_parameters()), core.anchors(),
        lam=cfg.loss.reg_lambda, normalization=cfg.loss.bce, regularizer=cfg.loss.regularizer, keep=keep)
    (loss * loss_scale).backward()
    return MicroStep(float(loss.detach()), selected.tolist(), bool(stats["empty_selection"]), pseudo_correct)


def optimizer_step(model: torch.nn.Module, optimizer, scheduler, grad_clip: float) -> float:
    """Average the replicated heads' gradients (FSDP only), clip to the global norm, step; return that norm."""
    reduce_replicated_grads(model)
    norm = clip_grad_norm(model, grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
