"""Plain in-process scoring: rows -> per-step (µ, σ). The Ray scorer stage and the evaluation job both call it."""

from __future__ import annotations

import torch

from actprm_ray.data.collate import collate_encoded, pack_encoded
from actprm_ray.data.step_format import encode_trajectory


def _batches(encoded: list[dict], order: list[int], batch_size: int, pack_tokens: int, pad_id: int):
    """(input indices, model batch, pack-local row of each read-out) in `order`: padded or packed."""
    if pack_tokens:
        for pack in pack_encoded([encoded[i] for i in order], pack_tokens):
            yield [order[j] for j in pack.pop("rows")], pack, pack["step_row"]
        return
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate_encoded([{**encoded[i], "labels": None} for i in idx], pad_id)
        yield idx, batch, batch["readout_batch"]


@torch.no_grad()
def score_encoded(model, encoded: list[dict], *, batch_size: int = 16, device: str | torch.device = "cpu",
                  pack_tokens: int = 0) -> list[dict]:
    """Score already-encoded rows, in length order to keep padding low; results in input order.

    pack_tokens > 0 packs rows end to end into lines of at most that many tokens instead of padding batches
    of `batch_size` rows (exact: tests/test_packing.py; it pays with flash-attention-2's varlen kernels, while
    sdpa and eager build a dense (T, T) mask over the whole line).
    """
    model.eval()
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    results: list[dict | None] = [None] * len(encoded)
    for idx, batch, step_row in _batches(encoded, order, batch_size, pack_tokens, pad_id):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        mu, sigma = model.score(batch)
        mu, sigma, rows = mu.cpu().tolist(), sigma.cpu().tolist(), step_row.tolist()
        per_row: dict[int, tuple[list, list]] = {b: ([], []) for b in range(len(idx))}
        for m, s, b in zip(mu, sigma, rows):
            per_row[b][0].append(m)
            per_row[b][1].append(s)
        for b, i in enumerate(idx):
            results[i] = {"step_mean": per_row[b][0], "step_std": per_row[b][1]}
    return results  # type: ignore[return-value]


def score_trajectories(model, tokenizer, rows: list[dict], *, sep: str, system_prompt: str, batch_size: int = 16,
                       max_length: int | None = None, device: str | torch.device = "cpu") -> list[dict]:
    """rows: dicts with "question" and "steps" -> [{"step_mean": [...], "step_std": [...]}] (one per step)."""
    encoded = []
    for r in rows:
        e = encode_trajectory(tokenizer, r["question"], r["steps"], sep=sep, system_prompt=system_prompt,
                              max_length=max_length)
        encoded.append({"input_ids": e.input_ids, "readout_positions": e.readout_positions})
    return score_encoded(model, encoded, batch_size=batch_size, device=device)
