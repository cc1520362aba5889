"""Causal-LM pretraining of the tiny backbone on unlabeled correct solutions: our analogue of a math backbone.

The paper starts from a math-pretrained 7B model; a random-init tiny decoder knows no arithmetic, so a PRM on it
can only learn lexical cues (docs/RESULTS.md). This teaches it the task's language and arithmetic first, with
**no step labels**: every training text is a *correct* synthetic solution (correct_share = 1), laid out exactly
as the PRM sees it (chat template, question, steps joined by the separator), so the separator token is learned
too. The data seed is disjoint from every pool and test seed (PRETRAIN_SEED); held-out metrics use another one.

Deterministic in its config (seeded data, init and shuffling; CPU, float32). The output is an ordinary HF
directory (safetensors) usable as `model.backbone`, plus `pretrain.json` with the config and the measured
before/after metrics. A directory whose `pretrain.json` holds the same config is reused, not rebuilt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from actprm_ray.data.step_format import DEFAULT_SEP, DEFAULT_SYSTEM_PROMPT

log = logging.getLogger(__name__)

# Pools use data seeds 0, 1, 2, ... (run.seed / data.synthetic_seed), tests 10,000 and up. Pretraining text
# comes from far outside both ranges, so no pool or test row is drawn from its generator.
PRETRAIN_SEED = 7_000_000
HELDOUT_SEED = PRETRAIN_SEED + 1


@dataclass
class PretrainConfig:
    out_dir: str = ""  # "" = <models cache>/tiny_math (what `model.backbone=tiny-math` uses); written atomically
    size: str = "tiny"  # a model.tiny.SIZES key
    mix: str = "addsub"  # a data.synthetic.MIXES key; rows are drawn with correct_share = 1 (no errors)
    rows: int = 42_048  # unlabeled correct solutions, one pass each per epoch
    epochs: int = 1
    data_seed: int = PRETRAIN_SEED
    init_seed: int = 0
    lr: float = 3e-3
    warmup_steps: int = 50
    batch_size: int = 32
    weight_decay: float = 0.0
    heldout_rows: int = 512
    sep: str = DEFAULT_SEP
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_length: int = 512
    log_every: int = 200  # steps between progress lines


def _solutions(n: int, seed: int, mix_name: str) -> list[tuple[str, list[str]]]:
    from actprm_ray.data.synthetic import MIXES, generate_pool

    if mix_name not in MIXES:
        raise ValueError(f"unknown mix {mix_name!r}; choose one of {sorted(MIXES)}")
    mix = dataclasses.replace(MIXES[mix_name], correct_share=1.0)
    return [(r["question"], r["steps"]) for r in generate_pool(n, seed=seed, mix=mix)]


def _encode(tokenizer, texts, cfg: PretrainConfig) -> list[list[int]]:
    from actprm_ray.data.step_format import encode_trajectory

    return [encode_trajectory(tokenizer, q, steps, sep=cfg.sep, system_prompt=cfg.system_prompt,
                              max_length=cfg.max_length).input_ids for q, steps in texts]


def result_token_mask(tokenizer, ids: list[int]) -> list[bool]:
    """True at the digit tokens of each step result (the number right after an `=`): where arithmetic shows."""
    pieces = tokenizer.convert_ids_to_tokens(ids)
    text = [tokenizer.convert_tokens_to_string([p]) for p in pieces]
    mask, in_result = [], False
    for t in text:
        if t.strip().endswith("="):
            in_result = True
            mask.append(False)
        elif in_result and t.strip() == "":
            mask.append(False)  # the space between "=" and the number
        elif in_result and t.strip().isdigit():
            mask.append(True)
        else:
            in_result = False
            mask.append(False)
    return mask


def _batches(seqs: list[list[int]], batch_size: int, pad_id: int):
    import torch

    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        yield ids, mask, labels, start


def evaluate_lm(model, tokenizer, seqs: list[list[int]], batch_size: int = 64) -> dict:
    """Held-out LM loss, next-token accuracy over every token, and over step-result digits only."""
    import torch

    model.eval()
    total_loss = total_tok = hit = res_hit = res_tok = 0.0
    masks = [result_token_mask(tokenizer, s) for s in seqs]
    with torch.no_grad():
        for ids, mask, labels, start in _batches(seqs, batch_size, tokenizer.pad_token_id):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            valid = target != -100
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100,
                                                     reduction="sum")
            correct = (logits.argmax(-1) == target) & valid
            total_loss += float(loss)
            total_tok += float(valid.sum())
            hit += float(correct.sum())
            for i in range(ids.shape[0]):
                m = torch.tensor(masks[start + i][1:] + [False] * (ids.shape[1] - len(masks[start + i])))
                res_hit += float(correct[i][m].sum())
                res_tok += float(m.sum())
    model.train()
    return dict(loss=total_loss / max(total_tok, 1), token_accuracy=hit / max(total_tok, 1),
                result_digit_accuracy=res_hit / max(res_tok, 1), result_digits=int(res_tok))


def backbone_dir(cfg: PretrainConfig) -> Path:
    """Where `cfg`'s backbone lives: its out_dir, or by default the models cache that also holds the imported
    GGUF models ($ACTPRM_MODELS_DIR or ~/.cache/actprm_ray/models): one backbone shared by every run."""
    from actprm_ray.model.import_gguf import models_dir

    return Path(cfg.out_dir).expanduser() if cfg.out_dir else models_dir() / "tiny_math"


def is_built(cfg: PretrainConfig) -> bool:
    """True when the backbone `cfg` describes is already built (pretrain_backbone then only returns its path)."""
    record = backbone_dir(cfg) / "pretrain.json"
    return record.is_file() and json.loads(record.read_text()).get("config") == _recorded_config(cfg)


def _recorded_config(cfg: PretrainConfig) -> dict:
    wanted = dataclasses.asdict(cfg)
    wanted.pop("out_dir")
    return wanted


def pretrain_backbone(cfg: PretrainConfig, report=log.info) -> Path:
    """Build (or reuse) the pretrained tiny backbone described by `cfg`; return its directory. `report(msg)` gets
    the progress lines (a job passes print: its users do not see INFO logs)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actprm_ray.model.ensemble_prm import add_separator_token
    from actprm_ray.model.tiny import build_tiny_backbone

    out = backbone_dir(cfg)
    wanted = _recorded_config(cfg)
    if is_built(cfg):
        return out
    if out.exists():
        raise FileExistsError(f"{out} holds a different backbone (its pretrain.json config differs); "
                              "choose another out_dir or delete it")
    work = out.with_name(out.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.time()
    build_tiny_backbone(work / "random_init", size=cfg.size, seed=cfg.init_seed)
    tokenizer = AutoTokenizer.from_pretrained(work / "random_init")
    torch.manual_seed(cfg.init_seed)
    model = AutoModelForCausalLM.from_pretrained(work / "random_init", dtype=torch.float32, use_safetensors=True)
    add_separator_token(tokenizer, model, cfg.sep)

    train = _encode(tokenizer, _solutions(cfg.rows, cfg.data_seed, cfg.mix), cfg)
    heldout = _encode(tokenizer, _solutions(cfg.heldout_rows, HELDOUT_SEED, cfg.mix), cfg)
    before = evaluate_lm(model, tokenizer, heldout)
    report(f"pretraining {cfg.size} on {len(train)} correct solutions x {cfg.epochs} epochs into {out}; "
           f"held-out before: {before}")

    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)) * max(0.0, (total - s) / total))
    gen = torch.Generator().manual_seed(cfg.data_seed)
    step, model_t0 = 0, time.time()
    model.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(train), generator=gen).tolist()
        for ids, mask, labels, _ in _batches([train[i] for i in order], cfg.batch_size, tokenizer.pad_token_id):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if cfg.log_every and step % cfg.log_every == 0:
                report(f"pretrain step {step}/{total} epoch {epoch} loss {loss.item():.4f} "
                       f"({time.time() - model_t0:.0f} s)")
    after = evaluate_lm(model, tokenizer, heldout)
    report(f"held-out after: {after}")

    final = work / "backbone"
    model.save_pretrained(final, safe_serialization=True)
    tokenizer.save_pretrained(final)
    (final / "pretrain.json").write_text(json.dumps(dict(
        config=wanted, steps=step, train_tokens=sum(len(s) for s in train), seconds=round(time.time() - t0, 1),
        heldout_before=before, heldout_after=after), indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    final.rename(out)  # atomic on one filesystem: a reader sees no backbone or the whole one
    shutil.rmtree(work, ignore_errors=True)
    return out



def surprise_first_errors(model, tokenizer, rows: list[dict], *, sep: str = DEFAULT_SEP,
                          system_prompt: str = DEFAULT_SYSTEM_PROMPT, threshold: float = 0.5,
                          batch_size: int = 64) -> list[int]:
    """The zero-label reference detector: the first step with a result digit to which the LM gives probability
    < threshold (-1 when none). It uses no step label at all, only the pretrained LM's surprise. (The prompt has
    no "=", so every marked digit lies in a step; step s spans the tokens up to its separator.)"""
    import bisect

    import torch

    from actprm_ray.data.step_format import encode_trajectory

    encoded = [encode_trajectory(tokenizer, r["question"], r["steps"], sep=sep, system_prompt=system_prompt)
               for r in rows]
    preds = []
    model.eval()
    with torch.no_grad():
        for ids, mask, _, start in _batches([e.input_ids for e in encoded], batch_size, tokenizer.pad_token_id):
            probs = model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)
            for i in range(ids.shape[0]):
                e = encoded[start + i]
                first = -1
                for p, is_digit in enumerate(result_token_mask(tokenizer, e.input_ids)):
                    if is_digit and float(probs[i, p - 1, e.input_ids[p]]) < threshold:
                        first = bisect.bisect_left(e.readout_positions, p)
                        break
                preds.append(first)
    return preds
