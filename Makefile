# The quick start: `make demo` and `make test` each set up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo lint format bench audit clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall only when the project's dependencies change.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

# The demo runs offline: it builds the sample world, serves it on 127.0.0.1 and runs pipelines/demo.yaml.
demo: $(STAMP)
	$(BIN)/curate demo --output demo-output
	$(BIN)/curate status demo-output/run

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Supply chain and code security: known vulnerabilities of every installed package (PyPI's advisory data;
# --strict fails when a package could not be checked, rather than passing silently), then ruff's
# flake8-bandit rules over the package code. Needs network access to pypi.org.
audit: $(STAMP)
	$(BIN)/pip-audit --strict --skip-editable --vulnerability-service pypi --progress-spinner off
	$(BIN)/ruff check --select S curate stages train

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_executors.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
