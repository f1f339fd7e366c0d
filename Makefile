# Everything runs from the venv at .venv (created by `make setup`).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup study test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

study: setup
	$(BIN)/scaling run jobs/quickstart.yaml --analyze

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python -m benchmarks.augment
	$(BIN)/python -m benchmarks.loss
	$(BIN)/python -m benchmarks.analysis
	$(BIN)/python -m benchmarks.overhead

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
