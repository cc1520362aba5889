"""Collation: encoded rows -> padded tensors plus flat read-out indices. Kept apart from the loops (TRL habit)."""

from __future__ import annotations

import torch


def collate_encoded(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids`; flatten read-out positions over the batch.

    Each row: {"input_ids": list[int], "readout_positions": list[int], optional "labels": list[int]}.
    Returns input_ids/attention_mask (B, T), readout_batch/readout_pos (N,) and step_row (N,) = the row of
    each read-out, plus labels (N,) when every row has labels. N = total surviving separators.
    """
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    rb, rp, labels = [], [], []
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
        mask[b, :n] = 1
        rb.extend([b] * len(r["readout_positions"]))
        rp.extend(int(p) for p in r["readout_positions"])
        if r.get("labels") is not None:
            labels.extend(int(y) for y in r["labels"])
    out = {
        "input_ids": ids,
        "attention_mask": mask,
        "readout_batch": torch.as_tensor(rb, dtype=torch.long),
        "readout_pos": torch.as_tensor(rp, dtype=torch.long),
    }
    if all(r.get("labels") is not None for r in rows):
        out["labels"] = torch.as_tensor(labels, dtype=torch.float32)
    return out


def padding_fraction(lengths: list[int], batch_size: int) -> float:
    """Share of padded tokens when `lengths` are batched in the given order."""
    total = padded = 0
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i : i + batch_size]
        total += max(chunk) * len(chunk)
        padded += max(chunk) * len(chunk) - sum(chunk)
    return padded / total if total else 0.0
