# One virtual environment for everything: `make demo` runs the quickstart, `make test` the test suite.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -n 2 --durations=25

demo: install
	$(VENV)/bin/ssl-kit run quickstart

clean:
	rm -rf $(VENV) runs .pytest_cache
