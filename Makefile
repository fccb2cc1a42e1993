# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv when missing, installs the project into it, fetches the offline data, and runs.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= data

.PHONY: demo test test-all lint venv data clean-venv

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

lint: venv
	$(PY) -m ruff check bame analysis tests

clean-venv:
	rm -rf $(VENV)
