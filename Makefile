# The two commands of the README. Both create ./.venv on first use (CPU build of torch).
# quickstart installs what the main job needs (the core, the LlamaIndex integration with Chroma, the
# server with `picaso-rag ingest`); test adds the test and Ray extras.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: quickstart test
quickstart: $(VENV)/.installed
	$(PY) examples/quickstart.py

test: $(VENV)/.installed-test
	$(PY) -m pytest

INTEGRATION := integrations/llama-index-llms-picaso
SERVER := integrations/picaso-server

$(VENV)/.installed: pyproject.toml $(INTEGRATION)/pyproject.toml $(SERVER)/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e . -e "$(INTEGRATION)[chroma]" -e "$(SERVER)[ingest]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e ".[test,ray]"
	touch $@
