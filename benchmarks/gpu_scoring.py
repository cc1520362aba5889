"""B3: PRM scoring throughput on one GPU with a Qwen2.5-7B-shaped backbone (random weights, nothing downloaded).

Compares, on the same rows (lengths uniform in 600..1,500 tokens, ~5-12 steps each) and the same weights:
    plain_eager  plain padded HF loop: batches in input order, AutoModel forward (eager attention), the 32 heads
                 run on every position, then the step positions are picked
    plain_sdpa   the same loop with SDPA attention (isolates the attention kernel's share of the gain)
    ours         the scorer path (actprm_ray.model.scoring.score_encoded): length-sorted batches, SDPA, features
                 gathered at the step separators before the heads
    ours_compiled  (opt-in, --variants) the same with torch.compile(backbone, dynamic=True): fused norms and
                 activations; compile time is reported apart (warm-up), not in the timed passes
    ours_packed_fa2[_compiled]  (opt-in) rows packed end to end into lines of batch x max_len tokens
                 (pipeline.score_pack_tokens) with flash-attention-2's varlen kernels: no padding at all. Needs a
                 GPU and the flash-attn package; skipped with the reason otherwise
and reports rows/s, tokens/s (real tokens, padding excluded) and MFU = 2 * N * tokens / time / peak, with N the
backbone's parameters minus the embedding table (a lookup does no multiply-adds) plus the heads, and peak the H100's
989 TFLOP/s dense bf16. Also checks that every variant gives the same µ.

    python benchmarks/gpu_scoring.py [--out results.json]          # GPU, < 6 minutes on an H100
    python benchmarks/gpu_scoring.py --dry_run --out /tmp/b3.json  # CPU, tiny shape, seconds (CI)

Depends only on torch, transformers, safetensors and actprm_ray.model / actprm_ray.data (no Ray, no omegaconf):
the GPU machine has torch and transformers alone. A batch size that runs out of memory falls back to the next.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from actprm_ray.model.ensemble_prm import EnsemblePRM, PRMConfig, mean_and_std  # noqa: E402
from actprm_ray.model.scoring import length_order, score_encoded  # noqa: E402

PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bf16, the MFU denominator
QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1_000_000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=512, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


class _PadOnly:
    """score_encoded needs only the pad id from the tokenizer; the rows here are token ids already."""

    pad_token_id = 0


def build_model(shape: dict, n_heads: int, dtype: torch.dtype, device: str, seed: int) -> EnsemblePRM:
    """Qwen2 backbone from config on the meta device, materialised on `device` and filled with random weights."""
    from transformers import AutoModel, Qwen2Config

    torch.manual_seed(seed)
    cfg = Qwen2Config(**shape)
    with torch.device("meta"):
        backbone = AutoModel.from_config(cfg, attn_implementation="sdpa")
    backbone = backbone.to(dtype).to_empty(device=device)  # the dtype cast is free on meta
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
        # Non-persistent buffers (RoPE inverse frequencies) are garbage after to_empty: rebuild them.
        for parent in list(backbone.modules()):
            for child_name, child in list(parent.named_children()):
                if hasattr(child, "inv_freq"):
                    setattr(parent, child_name, type(child)(config=backbone.config).to(device))
    model = EnsemblePRM(backbone, PRMConfig(n_heads=n_heads, init_seed=seed), tokenizer=_PadOnly())
    model.reset_heads()
    return model.to(device).eval()


def make_rows(n: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[dict]:
    """Random token rows: a 60-150 token prompt, then 5-12 steps, each ending in the separator (the last token)."""
    rng = random.Random(seed)
    sep = vocab - 1
    rows = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        prompt = rng.randint(min(60, length // 4), min(150, length // 2))
        m = rng.randint(5, 12)
        ends = sorted(rng.sample(range(prompt + 1, length - 1), m - 1)) + [length - 1]
        ids = [rng.randrange(10, vocab - 10) for _ in range(length)]
        for e in ends:
            ids[e] = sep
        rows.append({"input_ids": ids, "readout_positions": ends})
    return rows


def _set_attention(backbone, kind: str) -> None:
    try:
        backbone.set_attn_implementation(kind)
    except Exception:  # noqa: BLE001 -- older/newer transformers: the config attribute is what forward reads
        backbone.config._attn_implementation = kind


@torch.no_grad()
def score_plain(model: EnsemblePRM, rows: list[dict], batch_size: int, device: str) -> list[list[float]]:
    """The plain loop: input order, right padding, heads on every position, then pick the step positions."""
    heads = model.heads
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, r in enumerate(chunk):
            ids[b, : len(r["input_ids"])] = torch.as_tensor(r["input_ids"])
            mask[b, : len(r["input_ids"])] = 1
        hidden = model.backbone(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state.float()
        per_head = []
        for k in range(heads.w1.shape[0]):  # one MLP per head over all B*T positions, as a ModuleList would
            x = torch.relu(hidden @ heads.w1[k] + heads.b1[k])
            x = torch.relu(x @ heads.w2[k] + heads.b2[k])
            per_head.append((x @ heads.w3[k] + heads.b3[k]).squeeze(-1))  # (B, T)
        logits = torch.stack(per_head)  # (n, B, T)
        rb = torch.as_tensor([b for b, r in enumerate(chunk) for _ in r["readout_positions"]], device=device)
        rp = torch.as_tensor([p for r in chunk for p in r["readout_positions"]], device=device)
        mu, _ = mean_and_std(logits[:, rb, rp], model.config.unbiased_std)
        mu, rb = mu.cpu().tolist(), rb.cpu().tolist()
        for b in range(len(chunk)):
            out.append([m for m, row in zip(mu, rb) if row == b])
    return out


def score_ours(model: EnsemblePRM, rows: list[dict], batch_size: int, device: str) -> list[list[float]]:
    return [r["step_mean"] for r in score_encoded(model, rows, batch_size=batch_size, device=device)]


def score_packed(model: EnsemblePRM, rows: list[dict], batch_size: int, device: str) -> list[list[float]]:
    """score_encoded with packing: lines of up to batch_size x the longest row's tokens."""
    line = batch_size * max(len(r["input_ids"]) for r in rows)
    return [r["step_mean"] for r in score_encoded(model, rows, batch_size=batch_size, device=device, pack_tokens=line)]


def skip_reason(name: str, device: str) -> str | None:
    """Why a variant cannot run here (None: it can)."""
    if "packed_fa2" in name:
        import importlib.util

        if device != "cuda":
            return "flash-attention-2 needs a GPU"
        if importlib.util.find_spec("flash_attn") is None:
            return "the flash-attn package is not installed"
    return None


def padded_tokens(rows: list[dict], batch_size: int, order: list[int]) -> int:
    """Tokens the forward passes process, padding included, when rows are batched in `order`."""
    total = 0
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        total += max(len(rows[i]["input_ids"]) for i in idx) * len(idx)
    return total


def matmul_ceiling() -> float:
    """TFLOP/s of a large bf16 matrix product on this card now: the practical ceiling next to the 989 peak."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_variant(name: str, model, rows, batch_sizes, device, repeats: int) -> tuple[dict, list]:
    """Warm up on two batches, then time `repeats` full passes; on OOM fall back to the next batch size."""
    _set_attention(model.backbone, "eager" if name == "plain_eager" else
                   "flash_attention_2" if "packed_fa2" in name else "sdpa")
    fn = score_packed if "packed" in name else score_ours if name.startswith("ours") else score_plain
    eager_backbone = model.backbone
    if name.endswith("_compiled"):
        model.backbone = torch.compile(eager_backbone, dynamic=True)
    try:
        return _timed(name, fn, model, rows, batch_sizes, device, repeats)
    finally:
        model.backbone = eager_backbone


def _timed(name, fn, model, rows, batch_sizes, device, repeats) -> tuple[dict, list]:
    for bs in batch_sizes:
        oom = False
        try:
            t0 = time.perf_counter()
            fn(model, rows[: 2 * bs], bs, device)  # warm-up: kernels chosen (compiled), allocator primed
            _sync(device)
            warmup_s = time.perf_counter() - t0
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times, mu = [], None
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                mu = fn(model, rows, bs, device)
                _sync(device)
                times.append(time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            return {"variant": name, "batch_size": bs, "wall_s": min(times), "wall_s_all": times,
                    "warmup_s": warmup_s, "peak_mem_gib": peak}, mu
        except torch.cuda.OutOfMemoryError:
            oom = True
        if oom:  # outside the except block, so the failed attempt's tensors are really released
            print(f"[b3] {name}: out of memory at batch size {bs}, trying a smaller one", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    raise RuntimeError(f"{name}: out of memory at every batch size {batch_sizes}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry_run", action="store_true", help="CPU, fp32, tiny shape (for CI)")
    ap.add_argument("--rows", type=int, default=None, help="rows per pass (default 384; dry run 12)")
    ap.add_argument("--min_len", type=int, default=None)
    ap.add_argument("--max_len", type=int, default=None)
    ap.add_argument("--n_heads", type=int, default=None, help="ensemble size (default 32; dry run 4)")
    ap.add_argument("--batch_sizes", default=None, help="rows per forward, tried in order on OOM (default 16,8,4,2)")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per variant (the best is reported)")
    ap.add_argument("--variants", default="plain_eager,plain_sdpa,ours")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_scoring.json or benchmarks/results/)")
    a = ap.parse_args(argv)
    dry = a.dry_run
    device = "cpu" if dry or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    shape = TINY if dry else QWEN25_7B
    rows_n = a.rows or (12 if dry else 384)
    min_len, max_len = a.min_len or (40 if dry else 600), a.max_len or (90 if dry else 1500)
    n_heads = a.n_heads or (4 if dry else 32)
    batch_sizes = [int(x) for x in (a.batch_sizes or ("4" if dry else "16,8,4,2")).split(",")]

    ceiling = matmul_ceiling() if device == "cuda" else None
    t0 = time.perf_counter()
    model = build_model(shape, n_heads, dtype, device, a.seed)
    build_s = time.perf_counter() - t0
    rows = make_rows(rows_n, min_len, max_len, shape["vocab_size"], a.seed)
    tokens = sum(len(r["input_ids"]) for r in rows)
    n_total = sum(p.numel() for p in model.backbone.parameters())
    n_flops = n_total - model.backbone.get_input_embeddings().weight.numel() + sum(
        p.numel() for p in model.heads.parameters())
    flops = 2 * n_flops * tokens

    out = Path(a.out) if a.out else (Path(os.environ["OUT"]) if os.environ.get("OUT") else
                                     Path(__file__).resolve().parent / "results") / "gpu_scoring.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results, mus = [], {}
    skipped = {}
    for name in a.variants.split(","):
        if why := skip_reason(name, device):
            skipped[name] = why
            print(f"[b3] {name}: skipped ({skipped[name]})", flush=True)
            continue
        r, mus[name] = run_variant(name, model, rows, batch_sizes, device, a.repeats)
        # The padding of the batches each variant ran: score_encoded's length order, or the input order; packed
        # lines have none.
        order = (length_order([len(row["input_ids"]) for row in rows]) if name.startswith("ours")
                 else list(range(len(rows))))
        padded = tokens if "packed" in name else padded_tokens(rows, r["batch_size"], order)
        r.update(rows_per_s=rows_n / r["wall_s"], tokens_per_s=tokens / r["wall_s"],
                 padding_fraction=1 - tokens / padded,
                 tflops=flops / r["wall_s"] / 1e12, mfu=flops / r["wall_s"] / PEAK_BF16_FLOPS)
        results.append(r)
        print(f"[b3] {name}: {r['wall_s']:.2f}s at batch {r['batch_size']} (warm-up {r['warmup_s']:.1f}s)", flush=True)
        out.write_text(json.dumps({"partial": True, "variants": results}, indent=2))  # survives a timeout
    ref = mus[results[0]["variant"]]
    for r in results:
        r["mu_max_abs_diff_vs_first"] = max(abs(x - y) for a_, b_ in zip(mus[r["variant"]], ref) for x, y in zip(a_, b_))
    by = {r["variant"]: r for r in results}
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)" if dry else "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "dtype": str(dtype).replace("torch.", ""), "shape": shape, "n_heads": n_heads,
        "params_backbone": n_total, "params_flops": n_flops, "rows": rows_n, "tokens": tokens,
        "len_range": [min_len, max_len], "build_s": build_s, "peak_flops": PEAK_BF16_FLOPS,
        "matmul_8192_tflops": ceiling, "variants": results, "skipped": skipped,
        "speedup_ours_vs_plain_eager": (by["plain_eager"]["wall_s"] / by["ours"]["wall_s"]
                                        if {"ours", "plain_eager"} <= set(by) else None),
        "speedup_ours_vs_plain_sdpa": (by["plain_sdpa"]["wall_s"] / by["ours"]["wall_s"]
                                       if {"ours", "plain_sdpa"} <= set(by) else None),
        "ray_or_omegaconf_imported": sorted({m.split(".")[0] for m in sys.modules} & {"ray", "omegaconf"}),
    }
    out.write_text(json.dumps(report, indent=2))
    print(f"\nB3 GPU scoring: {report['device']}, {report['dtype']}, {n_flops / 1e9:.2f}B params (FLOP count), "
          f"{n_heads} heads, {rows_n} rows, {tokens} tokens, lengths {min_len}-{max_len}, model built in {build_s:.0f}s"
          + (f", 8192^3 bf16 matmul {ceiling:.0f} TFLOP/s" if ceiling else ""))
    print(f"{'variant':<12} {'batch':>5} {'wall s':>8} {'rows/s':>8} {'tokens/s':>10} {'pad %':>6} {'TFLOP/s':>8} "
          f"{'MFU %':>6} {'peak GiB':>8} {'max|dµ|':>9}")
    for r in results:
        peak = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{r['variant']:<12} {r['batch_size']:>5} {r['wall_s']:>8.2f} {r['rows_per_s']:>8.2f} "
              f"{r['tokens_per_s']:>10.0f} {100 * r['padding_fraction']:>6.1f} {r['tflops']:>8.1f} "
              f"{100 * r['mfu']:>6.1f} {peak:>8} {r['mu_max_abs_diff_vs_first']:>9.2e}")
    if report["speedup_ours_vs_plain_eager"]:
        print(f"ours vs plain_eager: {report['speedup_ours_vs_plain_eager']:.2f}x   "
              f"ours vs plain_sdpa: {report['speedup_ours_vs_plain_sdpa'] or float('nan'):.2f}x")
    print(f"JSON: {out}")
    return report


if __name__ == "__main__":
    main()
