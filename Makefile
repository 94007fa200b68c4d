# Quick start: `make demo` (all six notebooks offline on the tiny default) and `make test`.
# Both create .venv at the repo root and install the pinned dependencies + this package first;
# when nothing changed, set-up is a no-op (a stamp file tracks pyproject.toml and requirements.lock).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.jpcap-setup-done
PARAMS ?= params/smoke.yaml
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONWARNINGS := ignore::DeprecationWarning

.PHONY: setup demo test test-fast lint notebooks-sync notebooks-check clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	@touch $(STAMP)

demo: setup
	$(BIN)/jpcap run --params $(PARAMS)

test: setup lint
	$(BIN)/python -m pytest -q

# style and likely bugs (ruff, configured in pyproject.toml); part of `make test`
lint: setup
	$(BIN)/ruff check jpcap_helpers tests benchmarks notebooks

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Regenerate the output-free .ipynb files from the py:percent sources (the sources are the truth).
notebooks-sync: setup
	$(BIN)/jupytext --sync notebooks/*.py
	$(BIN)/python -m jpcap_helpers.notebooks strip notebooks/*.ipynb

notebooks-check: setup
	$(BIN)/python -m jpcap_helpers.notebooks check notebooks

clean-outputs:
	rm -rf outputs/smoke outputs/data outputs/models
