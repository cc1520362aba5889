"""The one scoring function: encoded rows -> per-step (µ, σ), for any PRM with `score(batch) -> (µ, σ)`.

Every scorer calls `score_encoded`: the loop's ScoreStage, the filter's FilterScoreStage, evaluation in-process
(eval/scorers.py) and evaluation on Ray (eval/ray_scorer.py, through the filter's stages). A model needs

    model.score(batch) -> (µ (N,), σ (N,))   at the N read-out positions of a collated or packed batch
    model.tokenizer.pad_token_id             (None pads with 0)

EnsemblePRM (µ, σ over its heads) and eval/qwen_prm.QwenPRM (µ = p(correct), σ = 0) both have them. The length
ordering of every forward batch is decided here, in `length_order`, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from actprm_ray.data.collate import collate_encoded, pack_encoded
from actprm_ray.data.step_format import encode_trajectory


def length_order(lengths: list[int]) -> list[int]:
    """Indices longest first (ties in input order). Neighbours have similar lengths, so batches cut from this
    order carry little padding, and the largest batch runs first: one that does not fit in memory fails at once
    rather than at the end of a long run."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """The padded batches score_encoded runs, as lists of indices into `lengths` (the eval report's padding
    arithmetic reads them too)."""
    order = length_order(lengths)
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def _batches(encoded: list[dict], batch_size: int, pack_tokens: int, pad_id: int):
    """(input indices, model batch, batch-local row of each read-out) in length order: padded or packed."""
    lengths = [len(e["input_ids"]) for e in encoded]
    if pack_tokens:
        order = length_order(lengths)
        for pack in pack_encoded([encoded[i] for i in order], pack_tokens):
            yield [order[j] for j in pack.pop("rows")], pack, pack["step_row"]
        return
    for idx in length_batches(lengths, batch_size):
        batch = collate_encoded([{**encoded[i], "labels": None} for i in idx], pad_id)
        yield idx, batch, batch["readout_batch"]


@torch.no_grad()
def score_encoded(model, encoded: list[dict], *, batch_size: int = 16, device: str | torch.device = "cpu",
                  pack_tokens: int = 0, on_batch: Callable[[int], None] | None = None) -> list[dict]:
    """Score already-encoded rows ({"input_ids", "readout_positions"}) in length order; results in input order,
    one {"step_mean": [...], "step_std": [...]} per row.

    pack_tokens > 0 packs rows end to end into lines of at most that many tokens instead of padding batches
    of `batch_size` rows (exact: tests/test_packing.py; it pays with flash-attention-2's varlen kernels, while
    sdpa and eager build a dense (T, T) mask over the whole line). on_batch(rows) is called after each forward
    pass with the number of rows it scored (progress reports).
    """
    model.eval()
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    results: list[dict | None] = [None] * len(encoded)
    for idx, batch, step_row in _batches(encoded, batch_size, pack_tokens, pad_id):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        mu, sigma = model.score(batch)
        mu, sigma, rows = mu.cpu().tolist(), sigma.cpu().tolist(), step_row.tolist()
        per_row: dict[int, tuple[list, list]] = {b: ([], []) for b in range(len(idx))}
        for m, s, b in zip(mu, sigma, rows):
            per_row[b][0].append(m)
            per_row[b][1].append(s)
        for b, i in enumerate(idx):
            results[i] = {"step_mean": per_row[b][0], "step_std": per_row[b][1]}
        if on_batch is not None:
            on_batch(len(idx))
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
