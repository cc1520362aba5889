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


def pack_encoded(rows: list[dict], max_tokens: int) -> list[dict]:
    """Pack rows end to end, without padding: one (1, T) line per pack, T <= max_tokens (a longer row is alone).

    Each pack has input_ids and position_ids (1, T), position ids restarting at 0 for every row, so RoPE sees
    each row exactly as if it were alone; readout_batch (all 0) and readout_pos (N,) point into the line;
    `rows` lists the input indices it holds and step_row (N,) the pack-local row of each read-out. The model
    must get no attention_mask: transformers then reads the row boundaries from the restarting position ids
    and masks attention between rows (masking_utils.find_packed_sequence_indices; flash-attention-2 uses
    varlen kernels), which is what makes packed scores equal padded ones.
    """
    packs, current, used = [], [], 0
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        if current and used + n > max_tokens:
            packs.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        packs.append(current)
    out = []
    for idx in packs:
        ids, pos, rp, step_row = [], [], [], []
        for j, i in enumerate(idx):
            r, offset = rows[i], len(ids)
            ids.extend(int(t) for t in r["input_ids"])
            pos.extend(range(len(r["input_ids"])))
            rp.extend(offset + int(p) for p in r["readout_positions"])
            step_row.extend([j] * len(r["readout_positions"]))
        out.append({"input_ids": torch.as_tensor([ids], dtype=torch.long),
                    "position_ids": torch.as_tensor([pos], dtype=torch.long),
                    "attention_mask": None,
                    "readout_batch": torch.zeros(len(rp), dtype=torch.long),
                    "readout_pos": torch.as_tensor(rp, dtype=torch.long),
                    "step_row": torch.as_tensor(step_row, dtype=torch.long), "rows": idx})
    return out


def padding_fraction(lengths: list[int], batch_size: int) -> float:
    """Share of padded tokens when `lengths` are batched in the given order."""
    total = padded = 0
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i : i + batch_size]
        total += max(chunk) * len(chunk)
        padded += max(chunk) * len(chunk) - sum(chunk)
    return padded / total if total else 0.0
