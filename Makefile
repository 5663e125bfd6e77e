# Two commands: `make demo` and `make test`. Both create .venv and install when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CORES ?= 2
DEMO_CONFIG := configs/demo.yaml
SNAKEMAKE := $(BIN)/snakemake --cores $(CORES) --rerun-incomplete --configfile $(DEMO_CONFIG)
SWEEP_CONFIG := $(DEMO_CONFIG) configs/hard.yaml configs/sweep.yaml

.PHONY: install lock demo test lint benchmark sweep report clean-demo real ablation real-resnet18

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

# Every method at three strengths on the hard synthetic cohort (configs/hard.yaml), 3 seeds for ERM
# and each method's default strength, evaluated side by side (not part of the demo). Niced: it is
# meant to run in the background. Its target is the evaluation (no exports of its 28 models).
sweep: $(STAMP)
	@start=$$(date +%s) && \
	nice -n 10 $(BIN)/wsi-scaat synth $(addprefix --config ,$(SWEEP_CONFIG)) && \
	nice -n 10 $(BIN)/snakemake evaluate --cores $(CORES) --keep-going --rerun-incomplete --configfile $(SWEEP_CONFIG) && \
	cat results/hard/evaluation/metrics.md && \
	$(BIN)/python scripts/readme_results.py results/hard/evaluation/metrics.md docs/evaluation.md hard && \
	cp results/hard/evaluation/tradeoff.png docs/images/hard_tradeoff.png && \
	echo "make sweep: $$(( ($$(date +%s) - start + 30) / 60 )) min on $(CORES) cores"

# Real tissue with pixel ground truth (docs/real_tissue.md): the WSSS4LUAD crops of ../shared, read as
# plain PNG slides. Builds data/wsss4luad (annotations from the label masks, a seeded split by image,
# the manifest), runs every stage with configs/wsss4luad.yaml and puts the evaluation table into
# docs/evaluation.md. Each job of these small images is brief, so each gets one core (two at a time).
# Skips, with a message and status 0, when the folder is absent.
REAL_DATA ?= ../shared/data/wsss4luad
REAL_CONFIG := configs/wsss4luad.yaml
REAL_COHORT := --classes 0=tumour,1=stroma,2=normal --ignore 3 --positive tumour --mpp 1.0 \
	--test 20 --val 12 --seed 0
REAL_SKIP = [ ! -d "$(REAL_DATA)/img" ] || [ ! -d "$(REAL_DATA)/mask" ]
REAL_BUILD = $(BIN)/wsi-scaat manifest-from-masks "$(REAL_DATA)/img" "$(REAL_DATA)/mask" --out data/wsss4luad $(REAL_COHORT)
ONE_CORE_JOBS := --set-threads tile=1 train=1 saliency=1 stitch=1 evaluate_model=1
real: $(STAMP)
	@if $(REAL_SKIP); then \
	  echo "make real: skipped: $(REAL_DATA)/img and mask/ not found (the WSSS4LUAD crops; see docs/real_tissue.md)"; \
	else \
	  start=$$(date +%s) && $(REAL_BUILD) && \
	  $(BIN)/snakemake --cores $(CORES) --keep-going --rerun-incomplete --configfile $(REAL_CONFIG) $(ONE_CORE_JOBS) && \
	  cat results/wsss4luad/evaluation/metrics.md && \
	  $(BIN)/python scripts/readme_results.py results/wsss4luad/evaluation/metrics.md docs/evaluation.md wsss4luad && \
	  $(BIN)/python scripts/readme_results.py results/wsss4luad/evaluation/metrics.md README.md wsss4luad && \
	  cp results/wsss4luad/evaluation/tradeoff.png docs/images/real_tradeoff.png && \
	  echo "make real: $$(( ($$(date +%s) - start + 30) / 60 )) min on $(CORES) cores"; \
	fi

# SCAAT's one-factor-at-a-time ablation (configs/ablation.yaml): every knob away from the default,
# 3 seeds each, on the real cohort's validation images (the test images stay held out); the table
# goes to docs/methods.md. Its target is the evaluation (no exports). Skips like `make real`.
ablation: $(STAMP)
	@if $(REAL_SKIP); then \
	  echo "make ablation: skipped: $(REAL_DATA)/img and mask/ not found (see docs/real_tissue.md)"; \
	else \
	  start=$$(date +%s) && $(REAL_BUILD) && \
	  $(BIN)/snakemake evaluate --cores $(CORES) --keep-going --rerun-incomplete --configfile $(REAL_CONFIG) configs/ablation.yaml \
	    $(ONE_CORE_JOBS) && \
	  cat results/wsss4luad_ablation/evaluation/metrics.md && \
	  $(BIN)/python scripts/readme_results.py results/wsss4luad_ablation/evaluation/metrics.md docs/methods.md ablation && \
	  echo "make ablation: $$(( ($$(date +%s) - start + 30) / 60 )) min on $(CORES) cores"; \
	fi

# The same comparison with a ResNet-18 (ERM and SCAAT, 3 seeds; configs/wsss4luad_resnet18.yaml).
real-resnet18: $(STAMP)
	@if $(REAL_SKIP); then \
	  echo "make real-resnet18: skipped: $(REAL_DATA)/img and mask/ not found (see docs/real_tissue.md)"; \
	else \
	  start=$$(date +%s) && $(REAL_BUILD) && \
	  $(BIN)/snakemake --cores $(CORES) --keep-going --rerun-incomplete --configfile $(REAL_CONFIG) configs/wsss4luad_resnet18.yaml \
	    $(ONE_CORE_JOBS) && \
	  cat results/wsss4luad_resnet18/evaluation/metrics.md && \
	  $(BIN)/python scripts/readme_results.py results/wsss4luad_resnet18/evaluation/metrics.md docs/evaluation.md wsss4luad_resnet18 && \
	  echo "make real-resnet18: $$(( ($$(date +%s) - start + 30) / 60 )) min on $(CORES) cores"; \
	fi

clean-demo:
	rm -rf results/demo data/demo

# The SLURM profile end to end: a one-node SLURM cluster on this machine (root, Debian), the small
# demo through configs/profiles/slurm and locally, jobs checked in sacct, outputs compared.
# About 6 minutes on 2 busy CPU cores, apt-get included (docs/cluster.md).
.PHONY: test-slurm
test-slurm: $(STAMP)
	bash tests/cluster/run_slurm.sh
