"""EnsemblePRM: any HF decoder-only backbone + n stacked MLP heads read at the step separators (METHOD §3).

    input_ids (B, T) -> backbone -> hidden (B, T, d) -> gather SEP positions -> feats (N, d) fp32
    -> heads: n x [d -> 128 -> ReLU -> 128 -> ReLU -> 1] as batched matmuls -> logits (n, N)
    µ = mean_k sigmoid(logits_k)   σ = population std_k sigmoid(logits_k)

Checkpoint directory (safetensors only, loadable with one call):
    config.json          {"actprm": PRMConfig, "backbone_config": {...}, "format_version": 1}
    heads.safetensors    heads + frozen anchors
    backbone/            the backbone (HF save_pretrained, safetensors)
    tokenizer files      including the separator token
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from actprm_ray.config import Config, ModelConfig, SelectionConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


_MODEL, _SELECTION = ModelConfig(), SelectionConfig()


@dataclass
class PRMConfig:
    """What a checkpoint needs besides its weights, saved as config.json's "actprm" entry: the heads' shape and
    initialisation, the step format its heads read, and the selection settings it was built with. The defaults
    are the config tree's (ModelConfig, SelectionConfig: one set of defaults); `from_config` takes a run's."""

    n_heads: int = _MODEL.n_heads
    head_hidden: int = _MODEL.head_hidden
    init_seed: int = _MODEL.init_seed
    init: str = _MODEL.init  # normal | truncated
    sep: str = _MODEL.sep
    system_prompt: str = _MODEL.system_prompt
    thresholds: dict = field(default_factory=lambda: {"delta_pred": _SELECTION.delta_pred,
                                                      "delta_std": _SELECTION.delta_std,
                                                      "step_threshold": _SELECTION.step_threshold})
    unbiased_std: bool = _SELECTION.unbiased_std

    @classmethod
    def from_config(cls, cfg: Config) -> "PRMConfig":
        m, s = cfg.model, cfg.selection
        return cls(n_heads=m.n_heads, head_hidden=m.head_hidden, init_seed=m.init_seed, init=m.init, sep=m.sep,
                   system_prompt=m.system_prompt, unbiased_std=s.unbiased_std,
                   thresholds={"delta_pred": s.delta_pred, "delta_std": s.delta_std,
                               "step_threshold": s.step_threshold})


class StackedHeads(nn.Module):
    """n independent MLPs stored stacked as [n, in, out] so all heads run as one batched matmul."""

    def __init__(self, n_heads: int, d_in: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_heads, d_in, hidden))
        self.b1 = nn.Parameter(torch.zeros(n_heads, 1, hidden))
        self.w2 = nn.Parameter(torch.empty(n_heads, hidden, hidden))
        self.b2 = nn.Parameter(torch.zeros(n_heads, 1, hidden))
        self.w3 = nn.Parameter(torch.empty(n_heads, hidden, 1))
        self.b3 = nn.Parameter(torch.zeros(n_heads, 1, 1))

    def reset_parameters(self, seed: int, kind: str = "normal") -> None:
        """Weights ~ Normal(0, 1/(2·sqrt(fan_in))), biases 0, an independent draw per head from `seed`."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for w in (self.w1, self.w2, self.w3):
                std = 1.0 / (2.0 * math.sqrt(w.shape[1]))
                draw = torch.randn(w.shape, generator=gen, dtype=torch.float32)
                if kind == "truncated":
                    draw = draw.clamp_(-2.0, 2.0)
                w.copy_(draw * std)
            for b in (self.b1, self.b2, self.b3):
                b.zero_()

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        # feats (N, d) -> broadcast to (n, N, d); baddbmm = bias + batched matmul per head.
        x = feats.unsqueeze(0).expand(self.w1.shape[0], -1, -1)
        x = torch.relu(torch.baddbmm(self.b1, x, self.w1))  # (n, N, h)
        x = torch.relu(torch.baddbmm(self.b2, x, self.w2))  # (n, N, h)
        return torch.baddbmm(self.b3, x, self.w3).squeeze(-1)  # (n, N)


def mean_and_std(logits: torch.Tensor, unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """µ = mean of per-head probabilities (not sigmoid of the mean logit); σ = population std (0 when n = 1)."""
    probs = torch.sigmoid(logits.float())  # (n, N)
    mu = probs.mean(0)
    if probs.shape[0] == 1:
        return mu, torch.zeros_like(mu)
    return mu, probs.std(0, unbiased=unbiased)


def blank_line_ids(tokenizer) -> list[int]:
    """The ids "\\n\\n" becomes *between two steps*, the text SEP stands for (METHOD §2).

    Read from "a\\n\\nb" with offsets, not from "\\n\\n" alone: the two differ on real tokenizers. SmolLM2 (GPT-2
    style pre-tokenizer) encodes a lone "\\n\\n" as the merged token ĊĊ (1116) but between two words as Ċ Ċ
    (198, 198); a SentencePiece tokenizer adds a "▁" prefix to a lone string. Qwen2 gives ĊĊ both ways. A
    tokenizer without offsets (a slow one) falls back to "\\n\\n" alone.
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer("a\n\nb", add_special_tokens=False, return_offsets_mapping=True)
        # Tokens lying inside characters 1..3 (the two newlines); one merged with "a" or "b" is left out.
        ids = [i for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]) if 1 <= s < e <= 3]
        if ids:
            return ids
    return tokenizer("\n\n", add_special_tokens=False)["input_ids"]


def add_separator_token(tokenizer, backbone: nn.Module, sep: str) -> bool:
    """Add `sep` as a special token if missing; seed its embedding from the blank line between two steps (the
    mean of blank_line_ids' rows). Returns True if added."""
    if sep in tokenizer.get_vocab():
        return False
    tokenizer.add_special_tokens({"additional_special_tokens": [sep]}, replace_extra_special_tokens=False)
    blank_ids = blank_line_ids(tokenizer)
    old_rows = backbone.get_input_embeddings().weight.shape[0]
    backbone.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=16, mean_resizing=False)
    emb = backbone.get_input_embeddings().weight
    with torch.no_grad():
        # Every new row (SEP and the padding up to a multiple of 16) gets the "\n\n" embedding: deterministic,
        # and SEP starts out meaning "paragraph break".
        emb[old_rows:] = emb[blank_ids].float().mean(0).to(emb.dtype)
    return True


def _load_backbone(path, dtype, trust_remote_code: bool, attn_implementation: str | None):
    """AutoModel from safetensors only. Off a terminal (Ray workers, `ray job submit` logs) transformers' per-load
    progress bar is switched off here: in attached mode the workers do not get our runtime env, and a bar in a
    log is a line per redraw."""
    import sys

    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True,
                                     **kwargs)


class EnsemblePRM(nn.Module):
    def __init__(self, backbone: nn.Module, config: PRMConfig, tokenizer=None):
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.tokenizer = tokenizer  # travels with the model so save/load keep the separator id
        d = backbone.config.hidden_size
        self.heads = StackedHeads(config.n_heads, d, config.head_hidden)
        # Anchors (θ_init) are buffers: saved, moved with .to(), never trained.
        for name, p in self.heads.named_parameters():
            self.register_buffer(f"anchor_{name}", torch.empty_like(p.data))

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_backbone(cls, backbone_dir: str | Path, config: PRMConfig, *, dtype: torch.dtype = torch.float32,
                      trust_remote_code: bool = False, attn_implementation: str | None = None) -> "EnsemblePRM":
        """Fresh heads on a pretrained backbone; heads are initialised explicitly *after* the backbone loads."""
        from transformers import AutoTokenizer

        _warn_remote_code(trust_remote_code)
        if Path(backbone_dir).is_dir():
            require_safetensors(Path(backbone_dir))
        tokenizer = AutoTokenizer.from_pretrained(backbone_dir, trust_remote_code=trust_remote_code)
        backbone = _load_backbone(backbone_dir, dtype, trust_remote_code, attn_implementation)
        added = add_separator_token(tokenizer, backbone, config.sep)
        if added:
            log.info("added separator %r to the tokenizer (vocab %d)", config.sep, len(tokenizer))
        model = cls(backbone, config, tokenizer)
        model.reset_heads()
        return model

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the backbone's activations in backward; non-reentrant, the variant FSDP2's re-gather needs.
        Call before sharding."""
        self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def reset_heads(self) -> None:
        self.heads.float()
        self.heads.reset_parameters(self.config.init_seed, self.config.init)
        self.reset_anchors()

    def reset_anchors(self) -> None:
        with torch.no_grad():
            for name, p in self.heads.named_parameters():
                getattr(self, f"anchor_{name}").copy_(p.data.float())

    def anchors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"anchor_{name}") for name, _ in self.heads.named_parameters()}

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask, readout_batch, readout_pos, position_ids=None) -> torch.Tensor:
        """Per-head logits (n, N) at the N read-out positions (flattened over the batch), in fp32.

        Packed input (data/collate.pack_encoded) passes position_ids and attention_mask=None. No KV cache: with
        one, transformers would not look for packed rows, and a scorer never decodes anyway.
        """
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state  # (B, T, d)
        feats = hidden[readout_batch, readout_pos].float()  # gather before the heads: (N, d)
        return self.heads(feats)

    def score(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(µ, σ) per read-out position for a collated batch (see data/collate.py)."""
        logits = self(batch["input_ids"], batch["attention_mask"], batch["readout_batch"], batch["readout_pos"],
                      batch.get("position_ids"))
        return mean_and_std(logits, self.config.unbiased_std)

    # -- weights in and out -------------------------------------------------------------------------------------
    def head_state(self) -> dict[str, torch.Tensor]:
        state = {f"heads.{k}": v for k, v in self.heads.state_dict().items()}
        state.update({f"anchor_{k}": v for k, v in ((n, getattr(self, f"anchor_{n}")) for n, _ in self.heads.named_parameters())})
        return state

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.head_state())
        if set(state) != expected:
            raise ValueError(f"head state keys differ: missing {sorted(expected - set(state))}, extra {sorted(set(state) - expected)}")
        self.heads.load_state_dict({k[len("heads."):]: v for k, v in state.items() if k.startswith("heads.")})
        with torch.no_grad():
            for name, buf in self.anchors().items():
                buf.copy_(state[f"anchor_{name}"])

    def publishable_state(self, what: str = "full") -> dict[str, torch.Tensor]:
        """What the trainer publishes to scorers: the whole model ("full") or only heads + anchors ("heads")."""
        state = self.state_dict() if what == "full" else self.head_state()
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def load_published_state(self, state: dict[str, torch.Tensor]) -> None:
        if any(k.startswith("backbone.") for k in state):
            self.load_state_dict(state, strict=True)
        else:
            self.load_head_state(state)

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """state_dict: this model's complete state to write instead of its own parameters (e.g. gathered from
        FSDP shards, where the module only holds this rank's shard)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            self.backbone.save_pretrained(out / "backbone")
            heads = self.head_state()
        else:
            self.backbone.save_pretrained(out / "backbone", state_dict={
                k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")})
            heads = {k: state_dict[k] for k in self.head_state()}
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out)
        save_file({k: v.detach().float().contiguous().cpu() for k, v in heads.items()}, out / "heads.safetensors")
        meta = {"format_version": FORMAT_VERSION, "actprm": asdict(self.config),
                "backbone_config": self.backbone.config.to_dict()}
        (out / "config.json").write_text(json.dumps(meta, indent=2, default=str))
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, dtype: torch.dtype = torch.float32,
                        trust_remote_code: bool = False, attn_implementation: str | None = None) -> "EnsemblePRM":
        from transformers import AutoTokenizer

        src = Path(directory)
        config = _checkpoint_config(src)
        _warn_remote_code(trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
        backbone = _load_backbone(src / "backbone", dtype, trust_remote_code, attn_implementation)
        model = cls(backbone, config, tokenizer)
        model.heads.float()
        model.load_head_state(load_file(src / "heads.safetensors"))
        return model

    @classmethod
    def skeleton(cls, directory: str | Path, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                 attn_implementation: str | None = None) -> "EnsemblePRM":
        """Checkpoint `directory`'s model without its weights: every parameter (and the anchors) on the meta device,
        so nothing is read and no memory taken; the backbone's computed buffers (rotary frequencies) are real.
        Sharded training builds this on every rank but 0 and receives its shards from rank 0
        (train/sharding.load_sharded). accelerate's init_empty_weights keeps the buffers off the meta device."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        src = Path(directory)
        config = _checkpoint_config(src)
        _warn_remote_code(trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
        backbone_config = AutoConfig.from_pretrained(src / "backbone", trust_remote_code=trust_remote_code)
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        with init_empty_weights(include_buffers=False):
            backbone = AutoModel.from_config(backbone_config, dtype=dtype, trust_remote_code=trust_remote_code,
                                             **kwargs)
            model = cls(backbone, config, tokenizer)
        model.heads.float()
        return model


def _checkpoint_config(src: Path) -> PRMConfig:
    """The PRMConfig of checkpoint `src`, refusing anything that is not an EnsemblePRM checkpoint or holds pickles."""
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is not an EnsemblePRM checkpoint (no config.json)")
    refuse_pickle_files(src)
    meta = json.loads((src / "config.json").read_text())
    if "actprm" not in meta:
        raise ValueError(f"{src}/config.json has no 'actprm' section: not an EnsemblePRM checkpoint")
    return PRMConfig(**meta["actprm"])


def refuse_pickle_files(directory: Path) -> None:
    """Weights are safetensors only: a pickle file can run arbitrary code when loaded."""
    bad = sorted(p.name for p in directory.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if bad:
        raise ValueError(f"refusing to load {directory}: pickle weight files {bad}; convert them to safetensors")


def require_safetensors(directory: Path) -> None:
    """A backbone directory must hold safetensors weights. Pickle files next to them are never read
    (use_safetensors=True), but a directory with pickle weights only gets a clear refusal, not HF's OSError."""
    if any(directory.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in directory.glob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"refusing to load {directory}: only pickle weight files {pickles}; "
                         "convert them to safetensors")


def _warn_remote_code(trust_remote_code: bool) -> None:
    if trust_remote_code:
        log.warning("!!! trust_remote_code=True: code shipped with the checkpoint will run in this process !!!")
