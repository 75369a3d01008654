# `make test` and `make demo` are the README's two commands; both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS := requirements/constraints.txt

.PHONY: install test lint demo bench ablate study-overfit study-transfer study-underfit studies clean

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

# Study 3's first run (the under-fitting ablation): its run JSONs are committed, so this re-makes its report from
# them without training (byte-identical to the committed docs/results/underfit/underfit.{md,csv}; a test checks it)
ablate: $(STAMP)
	$(PY) scripts/ablate.py --config configs/ablation_fmnist.yaml --out-dir docs/results/underfit \
	    --runs-dir docs/results/underfit/runs --stem underfit \
	    --title 'Study 3: the under-fitting ablation on Fashion-MNIST (re-analysed, paired)' --report-only

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache

# The three studies through the study engine (dropres-study, the product's trainer; issue 19), with the seed
# counts of configs/studies/*.yaml. Each target resumes (recorded runs are skipped), so it can be stopped and
# restarted across sessions. Records: docs/results/<study>/records/ (commit them); re-analyse them without
# training with `dropres-study configs/studies/<study>.yaml --report-only`.
STUDY_WORKERS ?= 2
study-overfit study-transfer study-underfit: study-%: $(STAMP)
	$(PY) -m timm_dropres.cli.study configs/studies/$*.yaml --workers $(STUDY_WORKERS) --threads 1 --resume

studies: study-overfit study-transfer study-underfit
