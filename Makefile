# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and installs the package (pinned by constraints.txt).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out
PYTEST_ARGS ?=

.PHONY: venv demo demo-train test bench lint clean

venv: $(STAMP)

# torch is installed first and alone so pip takes the pinned CPU build and never a CUDA one.
$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@! $(PY) -c "import torchvision" 2>/dev/null || (echo "torchvision is installed in $(VENV): it breaks transformers here; remove it" && exit 1)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tempo demo --out $(DEMO_DIR)

demo-train: $(STAMP)
	$(VENV)/bin/tempo demo-train --out $(DEMO_DIR)/train

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

bench: $(STAMP)
	$(PY) -m bench.run_all

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check . || true

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build dist *.egg-info
