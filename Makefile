# Two commands: `make demo` and `make test`. Both create .venv and install when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CORES ?= 2
DEMO_CONFIG := configs/demo.yaml
SNAKEMAKE := $(BIN)/snakemake --cores $(CORES) --configfile $(DEMO_CONFIG)
SWEEP_CONFIG := $(DEMO_CONFIG) configs/sweep.yaml

.PHONY: install lock demo test lint benchmark sweep report clean-demo

install: $(STAMP)

# Every package comes from requirements.lock (pip constraints), so a fresh install today equals
# the one that was tested; pyproject.toml keeps the compatible ranges for other environments.
PIP_VERSION := 26.3
UV_VERSION := 0.13.9
PIP_INSTALL := $(BIN)/python -m pip install --quiet -c requirements.lock

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet pip==$(PIP_VERSION)
	$(PIP_INSTALL) -e '.[dev]'
	@touch $(STAMP)

# Refresh requirements.lock (Python 3.11, Linux x86-64, every extra; opencv pair on one version).
lock: $(STAMP)
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(BIN)/python scripts/lock.py $(BIN)/uv

demo: $(STAMP)
	$(BIN)/wsi-scaat synth --config $(DEMO_CONFIG)
	$(SNAKEMAKE)
	@$(BIN)/wsi-scaat outputs --config $(DEMO_CONFIG)
	@$(BIN)/python scripts/readme_results.py results/demo/evaluation/metrics.md README.md

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check wsi_scaat tests benchmarks
	$(BIN)/ruff format --check wsi_scaat tests benchmarks
	$(BIN)/snakemake --lint --configfile $(DEMO_CONFIG)

benchmark: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# Snakemake's HTML report of the demo: training curves, overlays, evaluation table and figures.
report: $(STAMP)
	$(BIN)/snakemake --report results/demo/report.html --configfile $(DEMO_CONFIG)

# Every method at three strengths on a larger cohort, evaluated side by side (not part of the demo).
sweep: $(STAMP)
	$(BIN)/wsi-scaat synth $(addprefix --config ,$(SWEEP_CONFIG))
	$(BIN)/snakemake --cores $(CORES) --keep-going --configfile $(SWEEP_CONFIG)
	@cat results/sweep/evaluation/metrics.md
	@$(BIN)/python scripts/readme_results.py results/sweep/evaluation/metrics.md docs/evaluation.md
	@cp results/sweep/evaluation/tradeoff.png docs/images/sweep_tradeoff.png

clean-demo:
	rm -rf results/demo data/demo

# The SLURM profile end to end: a one-node SLURM cluster on this machine (root, Debian), the small
# demo through configs/profiles/slurm and locally, jobs checked in sacct, outputs compared.
# About 6 minutes on 2 busy CPU cores, apt-get included (docs/cluster.md).
.PHONY: test-slurm
test-slurm: $(STAMP)
	bash tests/cluster/run_slurm.sh
