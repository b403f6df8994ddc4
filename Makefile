# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SHARED ?= ../shared/data

.PHONY: demo test fuzz venv clean

venv: $(STAMP)

# torch is pinned to the CPU build on this machine's disk; installing it first keeps any
# dependency from pulling a newer or CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,serve]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m gaussad.demo --shared $(SHARED)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The fuzzers of tests/test_fuzz.py at 10,000 random cases each (make test runs 200 fixed ones).
fuzz: $(STAMP)
	GAUSSAD_FUZZ_EXAMPLES=10000 $(BIN)/python -m pytest -q -m fuzz --hypothesis-show-statistics

clean:
	rm -rf $(VENV) demo-data out .pytest_cache .hypothesis
