"""Qwen2.5-Math-PRM-style checkpoints, loaded without trust_remote_code.

Such a checkpoint is a Qwen2 decoder (`model.*` weights) plus a two-layer head

    score = Sequential(Linear(d, d), ReLU, Linear(d, 2))        keys score.0.weight/bias, score.2.weight/bias

read at every "<extra_0>" position; p(step correct) = softmax(logits)[1]. Its config.json points AutoModel at
remote code (Qwen2ForProcessRewardModel); we never run that code. AutoModel builds the plain backbone from
`model_type` (the head keys are left unused), and the head is rebuilt here from the safetensors tensors.

    input_ids (B, T) -> backbone -> hidden (B, T, d) -> gather SEP positions (N, d) -> fp32 head -> (N, 2)
    -> softmax[:, 1] = µ (N,)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from actprm_ray.data.step_format import DEFAULT_SEP

HEAD_KEYS = ("score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias")


def _safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors shards (from the index when there is one)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    return sorted(directory.glob("*.safetensors"))


def _head_locations(directory: Path) -> dict[str, Path]:
    """Which file holds each head key (only the headers are read, not the tensors)."""
    from safetensors import safe_open

    found: dict[str, Path] = {}
    for f in _safetensors_files(directory):
        with safe_open(f, framework="pt") as fh:
            for k in fh.keys():
                if k in HEAD_KEYS:
                    found[k] = f
    return found


def is_qwen_prm_checkpoint(directory: str | Path) -> bool:
    """True when the directory's safetensors hold `score.0.weight` (the Qwen-PRM head)."""
    d = Path(directory)
    return d.is_dir() and "score.0.weight" in _head_locations(d)


def load_score_head(directory: str | Path, hidden_size: int) -> nn.Sequential:
    """The `score` head as an fp32 Sequential(Linear(d, d), ReLU, Linear(d, 2)), weights from the safetensors."""
    from safetensors import safe_open

    d = Path(directory)
    where = _head_locations(d)
    missing = [k for k in HEAD_KEYS if k not in where]
    if missing:
        raise ValueError(f"{d}: missing head tensor(s) {missing} in its safetensors files")
    tensors = {}
    for k, f in where.items():
        with safe_open(f, framework="pt") as fh:
            tensors[k] = fh.get_tensor(k).float()
    head = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 2))
    expected = {"0.weight": (hidden_size, hidden_size), "0.bias": (hidden_size,), "2.weight": (2, hidden_size), "2.bias": (2,)}
    state = {}
    for short, shape in expected.items():
        t = tensors[f"score.{short}"]
        if tuple(t.shape) != shape:
            raise ValueError(f"{d}: score.{short} has shape {tuple(t.shape)}, expected {shape} for hidden size {hidden_size}")
        state[short] = t
    head.load_state_dict(state)
    return head.float()


class QwenPRM(nn.Module):
    """Backbone + two-class head. `score(batch) -> (µ, σ)` is EnsemblePRM's interface, so the one scoring
    function (model/scoring.score_encoded) serves both: µ = p(correct), σ = 0 (one head, no spread)."""

    def __init__(self, backbone: nn.Module, head: nn.Sequential, tokenizer, sep: str = DEFAULT_SEP):
        super().__init__()
        self.backbone, self.head, self.tokenizer, self.sep = backbone, head, tokenizer, sep

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, dtype: torch.dtype = torch.float32, sep: str = DEFAULT_SEP) -> "QwenPRM":
        from transformers import AutoModel, AutoTokenizer

        from actprm_ray.model.ensemble_prm import refuse_pickle_files

        d = Path(directory)
        refuse_pickle_files(d)
        tokenizer = AutoTokenizer.from_pretrained(d, trust_remote_code=False)
        if sep not in tokenizer.get_vocab():
            raise ValueError(f"{d}: tokenizer has no {sep!r} token; not a Qwen2.5-Math-PRM-style checkpoint")
        # trust_remote_code=False: the config's auto_map (remote Qwen2ForProcessRewardModel) is ignored and the
        # plain backbone for its model_type is built; the unused `score.*` keys only cause a load warning.
        backbone = AutoModel.from_pretrained(d, dtype=dtype, trust_remote_code=False, use_safetensors=True)
        head = load_score_head(d, backbone.config.hidden_size)
        return cls(backbone, head, tokenizer, sep)

    def forward(self, input_ids, attention_mask, readout_batch, readout_pos, position_ids=None) -> torch.Tensor:
        """p(correct) (N,) at the N read-out positions. Packed input (data/collate.pack_encoded) passes
        position_ids and attention_mask=None; no KV cache, or transformers would not look for packed rows."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state  # (B, T, d)
        feats = hidden[readout_batch, readout_pos].float()  # (N, d), gathered before the head
        return torch.softmax(self.head(feats), dim=-1)[:, 1]  # (N,)

    def score(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(µ, σ) per read-out position for a collated or packed batch: µ = p(correct), σ = 0."""
        mu = self(batch["input_ids"], batch["attention_mask"], batch["readout_batch"], batch["readout_pos"],
                  batch.get("position_ids"))
        return mu, torch.zeros_like(mu)


def build_tiny_qwen_prm(out_dir: str | Path, *, seed: int = 0, head_gain: float = 1.5) -> Path:
    """A tiny checkpoint in the Qwen2.5-Math-PRM layout, for tests: the tiny backbone with "<extra_0>" added,
    `model.*` weights + a random `score` head in one model.safetensors, and a config naming the remote class
    (which the loader must not need)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actprm_ray.model.tiny import build_tiny_backbone

    out = Path(out_dir)
    if (out / "model.safetensors").is_file():
        return out
    backbone_dir = build_tiny_backbone(out.parent / f"{out.name}_backbone", seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [DEFAULT_SEP]})
    lm = AutoModelForCausalLM.from_pretrained(backbone_dir)
    torch.manual_seed(seed)  # the new embedding row is drawn from the global generator
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    d = lm.config.hidden_size
    gen = torch.Generator().manual_seed(seed + 1)
    # std gain/sqrt(d) keeps each layer's output O(1), so p(correct) spreads over (0, 1) instead of saturating.
    head_std = head_gain / d**0.5
    state = {k: v.contiguous() for k, v in lm.state_dict().items() if not k.startswith("lm_head.")}
    state["score.0.weight"] = torch.randn(d, d, generator=gen) * head_std
    state["score.0.bias"] = torch.randn(d, generator=gen) * head_std
    state["score.2.weight"] = torch.randn(2, d, generator=gen) * head_std
    state["score.2.bias"] = torch.randn(2, generator=gen) * head_std
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = lm.config
    config.architectures = ["Qwen2ForProcessRewardModel"]
    config.tie_word_embeddings = False
    config.save_pretrained(out)
    # Point AutoModel at remote code, as the real checkpoint does; loading must work without it.
    cfg = json.loads((out / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tokenizer.save_pretrained(out)
    return out
