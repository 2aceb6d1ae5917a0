# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and installs the package (pinned by constraints.txt).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out
PYTEST_ARGS ?=

.PHONY: venv demo demo-train test bench lint clean parity parity-venv

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

# Parity with the real Hugging Face processor runs in a second venv, never mixed into .venv:
# torch 2.14.1 + torchvision 0.29.1 (the local wheels; torchvision breaks transformers in .venv),
# transformers 4.57.1 (the reference's) and qwen-vl-utils 0.0.14, plus what tempo_ops needs to
# import. The package itself is not installed there: the tests run from the source tree.
PARITY_VENV := .venv-parity
PARITY_PY := $(PARITY_VENV)/bin/python
PARITY_STAMP := $(PARITY_VENV)/.installed
PARITY_TORCH := torch==2.14.1 torchvision==0.29.1
PARITY_REQS := transformers==4.57.1 qwen-vl-utils==0.0.14 numpy==2.4.6 pillow fsspec==2026.9.0 \
	safetensors==0.8.0 pytest==9.2.0 hypothesis==6.170.15

parity-venv: $(PARITY_STAMP)

$(PARITY_STAMP): Makefile
	test -x $(PARITY_PY) || $(PYTHON) -m venv $(PARITY_VENV)
	$(PARITY_PY) -m pip install -q --upgrade pip
	$(PARITY_PY) -m pip install -q $(PARITY_TORCH)
	$(PARITY_PY) -m pip install -q $(PARITY_TORCH) $(PARITY_REQS)
	touch $(PARITY_STAMP)

parity: $(PARITY_STAMP)
	TEMPO_PARITY=1 PYTHONPATH=$(CURDIR) $(PARITY_PY) -m pytest -q -p no:cacheprovider -rs $(PYTEST_ARGS) tests/test_processor_parity.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check . || true

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build dist *.egg-info
