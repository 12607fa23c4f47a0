# Quick start: `make demo` trains the default job, `make test` runs the test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed

.PHONY: install test lint format demo bench bench-long clean
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

# The issue's four benchmarks, sized to finish in about 30 minutes on 2 CPU cores: attention
# (one layer against the peers and dense SDPA), flat (the paper's Figure 5), memory (depth,
# the per-token breakdown with the paper's accounting, the core's GFLOP/s against the matmul
# ceiling) and scale (the longest step in 20 GiB, capped at 60 s per step). Each writes
# bench/results/NAME.json and .png. The peers (reformer-pytorch, transformers) are installed
# under the same torch pin.
bench: $(STAMP)
	$(PIP) install -c constraints.txt -e '.[bench,test]'
	$(PY) -m bench.attention --lengths 1024 4096 16384 --max-seconds 10 --time-budget 900
	$(PY) -m bench.flat --tokens 65536 --lengths 1024 4096 16384 65536 --kinds lsh-1 lsh-4 full --repeats 1 --warmup 0
	$(PY) -m bench.memory_depth --reversible both
	$(PY) -m bench.memory_breakdown --length 16384
	$(PY) -m bench.scale --name scale_quick --budget-gib 20 --models small ablation --max-step-seconds 60 --warmup 0 --repeats 1 --time-budget 600

# The full-size runs behind the README's other tables (about 1.5 hours): attention at 64K,
# memory against length and chunking to 64K, the 20 GiB search with a 300 s cap per step,
# and cached decoding.
bench-long: $(STAMP)
	$(PIP) install -c constraints.txt -e '.[bench,test]'
	$(PY) -m bench.attention --name attention64k --lengths 65536 --configs lsh-1 lsh-4 local sdpa lsh-4-core --repeats 1 --time-budget 900
	$(PY) -m bench.memory_depth --name memory_length --lengths 4096 16384 65536 --layers 12 --reversible both --chunking both
	$(PY) -m bench.scale --budget-gib 20 --models small ablation --max-step-seconds 300 --warmup 0 --repeats 1 --time-budget 1500
	$(PY) -m bench.decode

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
