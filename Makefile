# `make test` and `make demo` build the same virtual environment from scratch when it is missing. The package
# accepts a range of torch versions (pyproject.toml); this is the exact pair it is tested with.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hafis-installed

.PHONY: test lint demo demo-quick bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: lint
	$(PY) -m pytest -q -n 2 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(VENV)/bin/hafis demo --out demo_out

demo-quick: $(STAMP)
	$(VENV)/bin/hafis demo --quick --out demo_out_quick

bench: $(STAMP)
	$(PY) benchmarks/weighting.py
	$(PY) benchmarks/step.py
	$(PY) benchmarks/loading.py
	$(PY) benchmarks/distributed.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
