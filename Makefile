# Both targets create and use the virtual environment at .venv (CPU torch from the pinned wheel).
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

.PHONY: install demo test default-model
install: $(VENV)/.installed

# Streams a completion from the built-in default model (shipped in dsinfer/default_model).
demo: install
	$(VENV)/bin/dsinfer generate "def fibonacci(n):" --max-tokens 64

# Retrains the built-in model from scratch (about an hour on 2 cores) and rewrites its MODEL_CARD.md.
default-model: install
	$(PY) -m dsinfer.tools.train --out dsinfer/default_model --steps 1400
	$(PY) -m dsinfer.tools.train.distill --model dsinfer/default_model --out dsinfer/default_model

test: install
	$(PY) -m pytest -q
