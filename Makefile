# Two commands on a fresh machine: `make retrain` and `make test`.
# Both bootstrap .venv from requirements.lock when it is missing or older than the lock.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
PLOTS_TEMPLATE := .dvc/plots.html

export PATH := $(BIN):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 2
export GX_ANALYTICS_ENABLED := false
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: venv retrain test lint lock bench server clean

venv: $(STAMP) $(PLOTS_TEMPLATE)

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "FanAOI needs Python 3.11 (set PYTHON=python3.11)"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

# `dvc plots show` draws with the vega libraries of the lock, inline: no CDN, works offline.
$(PLOTS_TEMPLATE): $(STAMP)
	$(BIN)/fanaoi plots-template

retrain: venv
	$(BIN)/fanaoi retrain

test: venv
	$(BIN)/python -m pytest

# The production Prefect server on PostgreSQL (README: Operating FanAOI).
server: venv
	$(BIN)/fanaoi server

lint: venv
	$(BIN)/ruff check .

# Re-pin after changing the dependencies in pyproject.toml.
lock: venv
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip freeze --exclude-editable > requirements.lock

bench: venv
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) models reports .pytest_cache
