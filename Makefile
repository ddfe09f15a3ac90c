# Both targets create and use the virtual environment at .venv (CPU torch from the pinned wheel).
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

# Builds tiny random-weight DeepSeek checkpoints (until the built-in trained model lands) and streams a completion.
demo: install
	$(PY) -m tests.checkpoints .demo
	$(VENV)/bin/dsinfer generate --model .demo/v3 "def quicksort(xs):" --max-tokens 32

test: install
	$(PY) -m pytest -q
