# Everything runs from the venv at .venv (created by `make setup`).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup study test bench clean chromium

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

study: setup
	$(BIN)/scaling run jobs/quickstart.yaml --analyze

test: setup chromium
	$(BIN)/python -m pytest -q tests

# tests/test_ui.py checks the MLflow UI in Debian's headless chromium (CI runs as root).
chromium:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

bench: setup
	$(BIN)/python -m benchmarks.augment
	$(BIN)/python -m benchmarks.loss
	$(BIN)/python -m benchmarks.analysis
	$(BIN)/python -m benchmarks.overhead
	$(BIN)/python -m benchmarks.bookkeeping
	$(BIN)/python -m benchmarks.quickstart

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
