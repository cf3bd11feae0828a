# The two commands a new user needs: `make demo` and `make test`. Both set everything up.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install install-server demo test test-all lint typecheck clean bundle broker-deps

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[train,dev]"
	@touch $(STAMP)

# The venv alone (make demo and make test do this too): .venv/bin/forecaster, or
# `. .venv/bin/activate` to have `forecaster` on PATH.
install: $(STAMP)

# The server install (as root, from a clone): scripts/install-server.sh, the one recipe.
install-server:
	bash scripts/install-server.sh

# System packages the tests use: a real mosquitto broker and its clients (mosquitto_sub),
# promtool, systemd-analyze.
broker-deps:
	@bash scripts/system-deps.sh

demo: $(STAMP) broker-deps
	$(PY) -m forecaster.demo

# Two pytest-xdist workers (a file's tests stay together, so module fixtures are built once):
# most tests wait on brokers and daemon processes, so two share 2 cores well.
test: $(STAMP) broker-deps
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile

test-all: $(STAMP) broker-deps
	$(PY) -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check forecaster tests benchmarks
	$(VENV)/bin/ruff format --check forecaster tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Rebuild the bundled models exactly as models/README.md records it.
bundle: $(STAMP)
	bash models/build.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache runs .demo
