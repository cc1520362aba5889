# The two commands of the README:  `make run` (embedded default job) and `make test` (the suite CI runs).
SHELL := /bin/bash
# One variable per line: `export A=1 B=2` would make A's value "1 B=2".
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled
export HF_HUB_OFFLINE := 1
export VLLM_HOST_IP := 127.0.0.1
export VLLM_CPU_KVCACHE_SPACE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1
VENV := .venv/bin

.PHONY: setup run test test-all test-fast
setup:
	bash scripts/install.sh

run: setup
	$(VENV)/python jobs/active_train.py $(ARGS)

# Everything but the `extended` tier (CI runs this on a fresh 2-core machine and must finish in 45 minutes, install included).
test: setup
	$(VENV)/python -m pytest -q -rs --durations=25 -m "not extended" $(PYTEST_ARGS)

# The whole suite, the extended fault/resume runs included (~15 minutes more).
test-all: setup
	$(VENV)/python -m pytest -q -rs --durations=25 $(PYTEST_ARGS)

# Pure-logic tests only (no Ray, no vLLM): seconds.
test-fast: setup
	$(VENV)/python -m pytest -q -m "not ray and not vllm and not slow" $(PYTEST_ARGS)
