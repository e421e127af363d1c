# The two commands of the README. Both create ./.venv on first use (CPU build of torch).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: quickstart test
quickstart: $(VENV)/.installed
	$(PY) examples/quickstart.py

test: $(VENV)/.installed
	$(PY) -m pytest

INTEGRATION := integrations/llama-index-llms-picaso
SERVER := integrations/picaso-server

$(VENV)/.installed: pyproject.toml $(INTEGRATION)/pyproject.toml $(SERVER)/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,ray]" -e $(INTEGRATION) -e $(SERVER)
	touch $@
