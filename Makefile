# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv from constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-slow lint constraints clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "error: Python 3.10+ is needed; run make PYTHON=python3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/raytrain-speech demo

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

lint: $(STAMP)
	$(PY) -m ruff check .

constraints: $(STAMP)
	{ echo "# Exact pins for every install (make demo, make test, CI). Regenerate with 'make constraints' after changing pyproject.toml."; \
	  $(PY) -m pip freeze --exclude-editable | grep -v -i '^raytrain'; } > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
