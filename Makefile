# The quick start: `make demo` and `make test` each set up .venv on first use, from uv.lock.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# uv comes from PyPI into a small venv of its own (.uv/), so the quick start needs only Python and make.
UV_VERSION := 0.13.9
UV_HOME    := .uv
UV         := $(UV_HOME)/bin/uv
# uv creates .venv with this Python, never one it would download.
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON_DOWNLOADS    := never

.PHONY: test demo lint format bench audit fuzz chaos lock clean

$(UV):
	$(PYTHON) -m venv $(UV_HOME)
	$(UV_HOME)/bin/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)

# Reinstall only when the lock changes. --locked refuses a uv.lock that no longer matches pyproject.toml
# (run `make lock`); sync is exact: .venv holds the locked dev set and curate (editable), nothing else.
# --compile-bytecode writes the .pyc files at install, as pip does (uv does not by default): without them
# every process compiles what it imports, every time where PYTHONDONTWRITEBYTECODE is set (import torch
# 4.5 s instead of 2.1, import ray 3.5 s instead of 1.5, a local Ray cluster's start twice the CPU). It
# costs about 40 s once; curate's own modules (installed editable, so not compiled by uv) take a second.
$(STAMP): uv.lock pyproject.toml | $(UV)
	$(UV) sync --locked --extra dev --python $(PYTHON) --compile-bytecode
	$(BIN)/python -m compileall -q curate stages train
	touch $(STAMP)

# Refresh uv.lock after a change of pyproject.toml's dependencies (newest releases that fit where it must
# change, the locked ones elsewhere); `make lock ARGS=--upgrade` moves everything to the newest.
lock: | $(UV)
	$(UV) lock $(ARGS)

# ruff's rules include flake8-bandit (S): unsafe calls fail here. The registry audit fails on yanked
# releases and on known vulnerabilities of the installed packages, from the registry's project pages.
test: $(STAMP)
	$(UV) lock --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/registry_audit.py --lock uv.lock --ignore audit-ignore.txt
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

# Every seed of the crash-consistency tests (make test runs one of each kind of kill).
chaos: $(STAMP)
	CURATE_CHAOS_ALL=1 $(BIN)/python -m pytest -q tests/test_chaos.py

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
	$(UV) sync --locked --inexact --extra dev --extra fuzz --python $(PYTHON)
	PYTHON=$(BIN)/python FUZZ_SECONDS=$(FUZZ_SECONDS) fuzz/run.sh

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_executors.py

clean:
	rm -rf $(VENV) $(UV_HOME) build *.egg-info .pytest_cache .ruff_cache
