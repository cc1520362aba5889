"""In-process scorers for evaluation: a checkpoint directory -> `scorer(rows) -> per-step µ`.

Two checkpoint kinds load without trust_remote_code:
- "ensemble": our EnsemblePRM directories (config.json with an "actprm" section); µ = mean head probability.
- "qwen_prm": Qwen2.5-Math-PRM-style directories (a `score.0/score.2` two-class head in the safetensors);
  µ = softmax(logits)[1] at each separator (see qwen_prm.py).
Both encode rows with the one canonical step format (data/step_format.py), so evaluation sees exactly what
training and loop scoring see. These scorers are the local stand-in for the Ray Data scorer stage: anything
with the same call shape plugs into batching.score_rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from actprm_ray.data.step_format import DEFAULT_SEP, DEFAULT_SYSTEM_PROMPT, encode_trajectory

TINY_SPECS = ("tiny", "tiny_qwen_prm")  # --checkpoint values that build an offline test model on the fly


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 backbone on GPU (METHOD §3); fp32 on CPU, where bf16 matmuls are slow and gain nothing."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class LocalScorer:
    """Encodes rows with the canonical format, caches the encodings between `lengths` and the call, and leaves
    the forward pass to `_score(encoded) -> per-row µ lists` in subclasses."""

    def __init__(self, tokenizer, *, sep: str, system_prompt: str, device: torch.device):
        self.tokenizer, self.sep, self.system_prompt, self.device = tokenizer, sep, system_prompt, device
        self._cache: dict[tuple, dict] = {}

    @staticmethod
    def _key(row: dict) -> tuple:
        return (row["id"], row["question"], tuple(row["steps"]))

    def _encode(self, row: dict) -> dict:
        e = encode_trajectory(self.tokenizer, row["question"], row["steps"], sep=self.sep,
                              system_prompt=self.system_prompt)  # no max_length: no truncation at evaluation
        # int32 arrays: a full PRMBench pass caches ~7M token ids, which as Python ints would cost ~250 MB.
        return {"input_ids": np.asarray(e.input_ids, dtype=np.int32), "readout_positions": e.readout_positions}

    def lengths(self, rows: list[dict]) -> list[int]:
        """Token count of each row (prompt + assistant span); the encodings are kept for the scoring call."""
        out = []
        for row in rows:
            key = self._key(row)
            if key not in self._cache:
                self._cache[key] = self._encode(row)
            enc = self._cache[key]
            out.append(len(enc["input_ids"]))
        return out

    def __call__(self, rows: list[dict]) -> list[list[float]]:
        encoded = [self._cache.pop(self._key(r), None) or self._encode(r) for r in rows]
        with torch.no_grad():
            return self._score(encoded)

    def _score(self, encoded: list[dict]) -> list[list[float]]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"sep": self.sep, "system_prompt": self.system_prompt, "device": str(self.device)}


class EnsembleScorer(LocalScorer):
    """µ from an EnsemblePRM: the mean over heads of sigmoid(logit) at each separator."""

    def __init__(self, model, *, system_prompt: str | None = None, device: torch.device | None = None):
        device = device or default_device()
        prompt = system_prompt if system_prompt is not None else (model.config.system_prompt or DEFAULT_SYSTEM_PROMPT)
        super().__init__(model.tokenizer, sep=model.config.sep, system_prompt=prompt, device=device)
        self.model = model.to(device).eval()

    def _score(self, encoded: list[dict]) -> list[list[float]]:
        from actprm_ray.model.scoring import score_encoded

        out = score_encoded(self.model, encoded, batch_size=len(encoded), device=self.device)
        return [r["step_mean"] for r in out]

    def describe(self) -> dict:
        return {**super().describe(), "kind": "ensemble", "n_heads": self.model.config.n_heads}


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
        cfg = PRMConfig(init_seed=seed, sep=DEFAULT_SEP, system_prompt=DEFAULT_SYSTEM_PROMPT)
        EnsemblePRM.from_backbone(backbone, cfg).save_pretrained(out)
    return out


def build_local_scorer(checkpoint: str | Path, *, kind: str = "auto", device: str | None = None,
                       system_prompt: str | None = None) -> LocalScorer:
    """Load `checkpoint` (kind "auto" | "ensemble" | "qwen_prm") as an in-process scorer."""
    dev = torch.device(device) if device else default_device()
    dtype = default_dtype(dev)
    kind = checkpoint_kind(checkpoint) if kind == "auto" else kind
    if kind == "ensemble":
        from actprm_ray.model.ensemble_prm import EnsemblePRM

        return EnsembleScorer(EnsemblePRM.from_pretrained(checkpoint, dtype=dtype), system_prompt=system_prompt, device=dev)
    if kind == "qwen_prm":
        from actprm_ray.eval.qwen_prm import QwenPRM, QwenPRMScorer

        model = QwenPRM.from_pretrained(checkpoint, dtype=dtype)
        return QwenPRMScorer(model, system_prompt=system_prompt or DEFAULT_SYSTEM_PROMPT, device=dev)
    raise ValueError(f"unknown checkpoint kind {kind!r}; choose auto, ensemble or qwen_prm")
