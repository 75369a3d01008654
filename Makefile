# `make test` and `make demo` are the README's two commands; both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS := requirements/constraints.txt

.PHONY: install test lint demo bench ablate study-overfit study-transfer studies clean \
	rerun-overfit rerun-transfer rerun-underfit reruns

$(STAMP): pyproject.toml setup.cfg $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check timm_dropres scripts tests benchmarks

test: $(STAMP) lint
	$(PY) -m pytest -q

demo: $(STAMP)
	bash scripts/demo.sh

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# Study 3 (the under-fitting ablation); its runs are committed, so this only redraws the report
ablate: $(STAMP)
	$(PY) scripts/ablate.py --config configs/ablation_fmnist.yaml --out-dir docs/results/underfit \
	    --runs-dir docs/results/underfit/runs --stem underfit --threads 1 \
	    --title 'Study 3: the under-fitting ablation on Fashion-MNIST (re-analysed, paired)'

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache

# Issue 9's studies: each resumes (finished runs are skipped); two workers share the over-fitting study.
study-overfit: $(STAMP)
	$(PY) scripts/ablate.py --config configs/study_overfit.yaml --out-dir docs/results/overfit \
	    --runs-dir docs/results/overfit/runs --stem overfit --threads 1 \
	    --title 'Study 1: over-fitting from scratch on Fashion-MNIST'

study-transfer: $(STAMP)
	$(PY) scripts/transfer.py --config configs/study_transfer.yaml --out-dir docs/results/transfer --threads 1

studies: study-overfit study-transfer ablate

# Issue 19: the three studies re-run through the study engine (dropres-study, the product's trainer), with the
# seed counts of configs/studies/*.yaml; each target resumes (recorded runs are skipped), so it can be stopped
# and restarted across sessions. Records: docs/results/<study>/records/ (commit them).
STUDY_WORKERS ?= 2
rerun-overfit rerun-transfer rerun-underfit: rerun-%: $(STAMP)
	$(PY) -m timm_dropres.cli.study studies/$*.yaml --workers $(STUDY_WORKERS) --threads 1 --resume

reruns: rerun-overfit rerun-transfer rerun-underfit

