# Quick start: `make demo` trains the default job, `make test` runs the test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed

.PHONY: install test lint format demo bench clean
DEMO_DIR ?= runs/demo

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench repro
	$(VENV)/bin/ruff format --check src tests bench repro

format: $(STAMP)
	$(VENV)/bin/ruff format src tests bench repro
	$(VENV)/bin/ruff check --fix src tests bench repro

test: $(STAMP) lint
	$(PY) -m pytest -q

# Trains the paper's duplication task (duplication-small preset, a few CPU minutes), then
# prints the accuracy table for 1, 2, 4 and 8 evaluation hashes and draws the curves.
# Running it again resumes the finished run and only re-evaluates.
demo: $(STAMP)
	$(VENV)/bin/reformer train --preset duplication-small --out $(DEMO_DIR) --resume
	$(VENV)/bin/reformer plot $(DEMO_DIR)

# The benchmarks, sized to finish in about an hour on 2 CPU cores (each writes
# bench/results/NAME.json and .png; bench/README.md has the full-size commands). The peers
# (reformer-pytorch, transformers) are installed under the same torch pin.
bench: $(STAMP)
	$(PIP) install -c constraints.txt -e '.[bench,test]'
	$(PY) -m bench.memory_depth --reversible both
	$(PY) -m bench.memory_depth --name memory_length --lengths 4096 16384 65536 --layers 12 --reversible both --chunking both
	$(PY) -m bench.attention --lengths 1024 4096 16384 --time-budget 900
	$(PY) -m bench.attention --name attention64k --lengths 65536 --configs lsh-1 lsh-4 local sdpa --repeats 1 --time-budget 600
	$(PY) -m bench.flat --tokens 65536 --lengths 1024 4096 16384 65536 --kinds lsh-1 lsh-4 full --repeats 1 --time-budget 900
	$(PY) -m bench.decode

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
