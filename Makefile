# The quick start: `make demo` and `make test` each set up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo lint format bench audit fuzz clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall only when the project's dependencies change.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# ruff's rules include flake8-bandit (S): unsafe calls fail here. The registry audit fails on yanked
# releases and on known vulnerabilities of the installed packages, from the registry's project pages.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/registry_audit.py --ignore audit-ignore.txt
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

# The full supply-chain audit: known vulnerabilities of every installed release, old ones included (PyPI's
# advisory data; --strict fails when a package could not be checked, rather than passing silently), then
# ruff's flake8-bandit rules over the package code. Needs PyPI's per-release JSON, which a mirror that
# serves project pages only does not give: there, `make test` runs scripts/registry_audit.py instead.
audit: $(STAMP)
	$(BIN)/pip-audit --strict --skip-editable --vulnerability-service pypi --progress-spinner off
	$(BIN)/ruff check --select S curate stages train

# Coverage-guided fuzzing (atheris, installed on first use) of image decoding, shard reading, caption cleaning
# and input parsing: FUZZ_SECONDS each (default 60) from the seeds in fuzz/corpus/; new corpus entries and
# crashing inputs go to fuzz/.work/ (not in git). Fails when a harness finds a crash. See fuzz/README.md.
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	$(BIN)/python -c "import atheris" 2>/dev/null || $(BIN)/pip install -q 'atheris>=2.3'
	PYTHON=$(BIN)/python FUZZ_SECONDS=$(FUZZ_SECONDS) fuzz/run.sh

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_executors.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
