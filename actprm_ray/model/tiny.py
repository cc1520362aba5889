"""Tiny offline backbones: a random-initialised decoder plus a locally trained BPE tokenizer, built in seconds.

Nothing is downloaded. The result is an ordinary HF directory (config, safetensors, tokenizer) that
`AutoModel`, `EnsemblePRM.from_backbone` and vLLM (CPU build) all load. The recipe follows STACK_NOTES §3:
in transformers 5.x `AutoTokenizer` rebuilds a Qwen2 tokenizer's pre-tokenizer, so we train with exactly
that pipeline or the ids would change on reload.
"""

from __future__ import annotations

import random
from pathlib import Path

QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# A deliberately plain template: system / user / assistant markers, nothing model specific.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|pad|>"]

# Sizes: "tiny" is the test model (~92k params, head_dim 32 as vLLM-CPU requires);
# "small" is compute-bound enough for the pipeline-overhead benchmark.
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2),
}


def _corpus(num_lines: int, seed: int) -> list[str]:
    """Arithmetic sentences and judge-prompt words: enough for the BPE merges to cover what we feed the model."""
    rng = random.Random(seed)
    words = (
        "the a of to and is we so then total each find answer step first next add subtract multiply divide "
        "paragraph problem solution analysis conclusion correct incorrect review check error wrong right "
        "apples books dollars hours minutes cars boxes students price cost left more less times equals"
    ).split()
    lines = []
    for _ in range(num_lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*/")
        phrase = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
        lines.append(f"{phrase.capitalize()}: {a} {op} {b} = {rng.randint(0, 9999)}.")
        lines.append(f"<paragraph_{rng.randint(1, 9)}>{phrase}</paragraph_{rng.randint(1, 9)}> \\boxed{{{a}}}")
    return lines


def train_tokenizer(vocab_size: int = 512, seed: int = 0):
    """Byte-level BPE trained on a built-in corpus, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_RE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(4000, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_backbone(out_dir: str | Path, *, size: str = "tiny", seed: int = 0, max_positions: int = 2048) -> Path:
    """Write a random-initialised Qwen2-architecture decoder and its tokenizer to `out_dir`; return the path."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    if size not in SIZES:
        raise ValueError(f"unknown tiny backbone size {size!r}; choose one of {sorted(SIZES)}")
    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(seed=seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SIZES[size],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
