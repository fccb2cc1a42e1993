# The set-up commands of the README: `make demo`, `make test` and `make notebooks`.
# Each creates .venv when missing, installs the project into it, fetches the offline data, and runs.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= data
# `make notebooks`: results mode (the committed study's figures, seconds per notebook); BAME_NOTEBOOK_MODE=quick
# trains tiny runs instead (what CI checks), =full trains the study again (hours)
BAME_NOTEBOOK_MODE ?= results
NOTEBOOK_HTML      ?= runs/notebooks/html

.PHONY: demo test test-all lint notebooks venv data clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

data: venv
	$(PY) -m bame data get fashion-mnist --root $(DATA)
	$(PY) -m bame data get mnist --root $(DATA)

demo: venv data
	$(PY) -m bame demo --root $(DATA)

test: venv data
	$(PY) -m pytest -q

test-all: venv data
	$(PY) -m pytest -q -m ''

# Every notebook executed into $(NOTEBOOK_HTML)/<notebook>.html (the kernel is the venv's python: the
# one that runs nbconvert).
notebooks: venv data
	BAME_NOTEBOOK_MODE=$(BAME_NOTEBOOK_MODE) \
	$(PY) -m jupyter nbconvert --execute --to html --output-dir $(NOTEBOOK_HTML) notebooks/*.ipynb

lint: venv
	$(PY) -m ruff check bame analysis tests

clean-venv:
	rm -rf $(VENV)
