"""The in-process scorer for evaluation: a checkpoint directory -> `LocalScorer`, a batching.Scorer.

Two checkpoint kinds load without trust_remote_code:
- "ensemble": our EnsemblePRM directories (config.json with an "actprm" section); µ = mean head probability.
- "qwen_prm": Qwen2.5-Math-PRM-style directories (a `score.0/score.2` two-class head in the safetensors);
  µ = softmax(logits)[1] at each separator (see qwen_prm.py).
Both models have `score(batch) -> (µ, σ)`, so one scorer serves both and scores with the one scoring function,
model/scoring.score_encoded. Both encode rows with the one canonical step format (data/step_format.py), so
evaluation sees exactly what training and loop scoring see.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from actprm_ray.data.step_format import DEFAULT_SYSTEM_PROMPT, encode_trajectory
from actprm_ray.eval.batching import Scored, token_limit_reason
from actprm_ray.model.scoring import length_batches, score_encoded

TINY_SPECS = ("tiny", "tiny_qwen_prm")  # eval.checkpoint values that build an offline test model on the fly


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 backbone on GPU (METHOD §3); fp32 on CPU, where bf16 matmuls are slow and gain nothing."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class LocalScorer:
    """Scores rows in this process: encodes each row once with the canonical format, then score_encoded.

    `info` says what the model is ({"kind": ..., and for an ensemble "n_heads"}), for the report's meta."""

    def __init__(self, model, *, sep: str, system_prompt: str, device: torch.device, info: dict):
        self.model = model.to(device).eval()
        self.sep, self.system_prompt, self.device, self.info = sep, system_prompt, device, info

    def _encode(self, row: dict) -> dict:
        e = encode_trajectory(self.model.tokenizer, row["question"], row["steps"], sep=self.sep,
                              system_prompt=self.system_prompt)  # no max_length: no truncation at evaluation
        # int32 arrays: a full PRMBench pass holds ~7M token ids, which as Python ints would cost ~250 MB.
        return {"input_ids": np.asarray(e.input_ids, dtype=np.int32), "readout_positions": e.readout_positions}

    def __call__(self, rows: list[dict], *, batch_size: int, max_tokens: int | None = None,
                 progress: Callable[[int], None] | None = None) -> Scored:
        encoded = [self._encode(r) for r in rows]
        lengths = [len(e["input_ids"]) for e in encoded]
        reasons = {j: why for j, n in enumerate(lengths) if (why := token_limit_reason(n, max_tokens))}
        keep = [j for j in range(len(rows)) if j not in reasons]
        out = score_encoded(self.model, [encoded[j] for j in keep], batch_size=batch_size, device=self.device,
                            on_batch=progress)
        mus: list[list[float] | None] = [None] * len(rows)
        for j, r in zip(keep, out):
            mus[j] = r["step_mean"]
        batches = [[keep[i] for i in b] for b in length_batches([lengths[j] for j in keep], batch_size)]
        return Scored(mus, reasons, lengths, batches)

    def describe(self) -> dict:
        return {"sep": self.sep, "system_prompt": self.system_prompt, "device": str(self.device), **self.info}


def checkpoint_kind(directory: str | Path) -> str:
    """"ensemble" (config.json has an "actprm" section) or "qwen_prm" (safetensors hold score.0.weight)."""
    from actprm_ray.eval.qwen_prm import is_qwen_prm_checkpoint

    d = Path(directory)
    cfg = d / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"checkpoint {d}: no config.json")
    if "actprm" in json.loads(cfg.read_text()):
        return "ensemble"
    if is_qwen_prm_checkpoint(d):
        return "qwen_prm"
    raise ValueError(f"checkpoint {d}: neither an EnsemblePRM directory (no 'actprm' in config.json) nor a "
                     "Qwen2.5-Math-PRM-style one (no 'score.0.weight' in its safetensors)")


def build_tiny_checkpoint(spec: str, workdir: str | Path, seed: int = 0) -> Path:
    """Offline test checkpoints: "tiny" = EnsemblePRM (32 fresh heads) on the tiny backbone,
    "tiny_qwen_prm" = the tiny backbone with a random two-class `score` head."""
    from actprm_ray.model.tiny import build_tiny_backbone

    workdir = Path(workdir)
    if spec == "tiny_qwen_prm":
        from actprm_ray.eval.qwen_prm import build_tiny_qwen_prm

        return build_tiny_qwen_prm(workdir / "tiny_qwen_prm", seed=seed)
    if spec != "tiny":
        raise ValueError(f"unknown tiny checkpoint {spec!r}; choose one of {TINY_SPECS}")
    out = workdir / "tiny_ensemble"
    if not (out / "config.json").is_file():
        from actprm_ray.model.ensemble_prm import EnsemblePRM, PRMConfig

        backbone = build_tiny_backbone(workdir / "tiny_backbone", seed=seed)
        EnsemblePRM.from_backbone(backbone, PRMConfig(init_seed=seed)).save_pretrained(out)
    return out


def build_local_scorer(checkpoint: str | Path, *, kind: str = "auto", device: str | None = None,
                       system_prompt: str | None = None) -> LocalScorer:
    """Load `checkpoint` (kind "auto" | "ensemble" | "qwen_prm") as an in-process scorer. The system prompt
    defaults to the ensemble's own (the format its heads were trained on), else DEFAULT_SYSTEM_PROMPT."""
    dev = torch.device(device) if device else default_device()
    dtype = default_dtype(dev)
    kind = checkpoint_kind(checkpoint) if kind == "auto" else kind
    if kind == "ensemble":
        from actprm_ray.model.ensemble_prm import EnsemblePRM

        model = EnsemblePRM.from_pretrained(checkpoint, dtype=dtype)
        prompt = system_prompt if system_prompt is not None else (model.config.system_prompt or DEFAULT_SYSTEM_PROMPT)
        return LocalScorer(model, sep=model.config.sep, system_prompt=prompt, device=dev,
                           info={"kind": "ensemble", "n_heads": model.config.n_heads})
    if kind == "qwen_prm":
        from actprm_ray.eval.qwen_prm import QwenPRM

        model = QwenPRM.from_pretrained(checkpoint, dtype=dtype)
        return LocalScorer(model, sep=model.sep, system_prompt=system_prompt or DEFAULT_SYSTEM_PROMPT, device=dev,
                           info={"kind": "qwen_prm"})
    raise ValueError(f"unknown checkpoint kind {kind!r}; choose auto, ensemble or qwen_prm")
