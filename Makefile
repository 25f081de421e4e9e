# The quick start: `make demo` and `make test` each set up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo lint format bench clean

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

# The demo runs offline: a generated LAION-style input of 10,000 rows through pipelines/demo.yaml.
demo: $(STAMP)
	$(BIN)/python -c "from curate.testing import make_input; make_input('demo-output/input/urls.parquet', 10000, bad_every=23)"
	$(BIN)/curate validate pipelines/demo.yaml
	$(BIN)/curate run pipelines/demo.yaml --overwrite
	$(BIN)/curate status demo-output/run

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_executors.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
