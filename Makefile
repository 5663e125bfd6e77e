# Two commands: `make demo` and `make test`. Both create .venv and install when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CORES ?= 2
DEMO_CONFIG := configs/demo.yaml
SNAKEMAKE := $(BIN)/snakemake --cores $(CORES) --configfile $(DEMO_CONFIG)

.PHONY: install demo test lint benchmark clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/wsi-scaat synth --config $(DEMO_CONFIG)
	$(SNAKEMAKE)
	@$(BIN)/wsi-scaat outputs --config $(DEMO_CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check wsi_scaat tests benchmarks
	$(BIN)/ruff format --check wsi_scaat tests benchmarks
	$(BIN)/snakemake --lint --configfile $(DEMO_CONFIG)

benchmark: $(STAMP)
	$(BIN)/python benchmarks/bench_tiling.py
	$(BIN)/python benchmarks/bench_training.py
	$(BIN)/python benchmarks/bench_stitching.py

clean-demo:
	rm -rf results/demo data/demo
