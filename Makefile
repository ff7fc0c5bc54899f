# `make test` and `make demo` build the same virtual environment from scratch when it is missing. The package
# accepts a range of torch versions (pyproject.toml); this is the exact pair it is tested with.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hafis-installed

.PHONY: test lint demo demo-quick fashion-mnist bench clean

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

demo: $(STAMP) fashion-mnist
	$(VENV)/bin/hafis demo --out demo_out

demo-quick: $(STAMP) fashion-mnist
	$(VENV)/bin/hafis demo --quick --out demo_out_quick

# The demo's garments need Fashion-MNIST: Debian's package where apt-get can install it; elsewhere the demo says how
# to get it and runs on the built-in synthetic scenes.
fashion-mnist:
	@if [ -z "$$HAFIS_FASHION_MNIST" ] && [ ! -e /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || \
	      echo "apt-get could not install dataset-fashion-mnist: the demo runs on the synthetic scenes"; \
	  else \
	    echo "Fashion-MNIST not found and apt-get not usable here: the demo runs on the synthetic scenes"; \
	  fi; \
	fi

bench: $(STAMP)
	$(PY) benchmarks/weighting.py
	$(PY) benchmarks/step.py
	$(PY) benchmarks/loading.py
	$(PY) benchmarks/distributed.py
	$(PY) benchmarks/predict.py
	$(PY) benchmarks/export.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
