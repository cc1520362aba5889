"""Plain in-process scoring: rows -> per-step (µ, σ). The Ray scorer stage and the evaluation job both call it."""

from __future__ import annotations

import torch

from actprm_ray.data.collate import collate_encoded
from actprm_ray.data.step_format import encode_trajectory


@torch.no_grad()
def score_encoded(model, encoded: list[dict], *, batch_size: int = 16, device: str | torch.device = "cpu") -> list[dict]:
    """Score already-encoded rows; batches are formed in length order to keep padding low, results in input order."""
    model.eval()
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    results: list[dict | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate_encoded([{**encoded[i], "labels": None} for i in idx], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        mu, sigma = model.score(batch)
        mu, sigma, rows = mu.cpu().tolist(), sigma.cpu().tolist(), batch["readout_batch"].cpu().tolist()
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
