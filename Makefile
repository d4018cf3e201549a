# README's two commands: `make demo` and `make test`. Each creates .venv on first use.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: demo test lint bench docs clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(VPY) -m pip install -q -e '.[dev,docs]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ex2l demo --out runs/demo

test: $(STAMP)
	$(VPY) -m ruff check ex2l_xai analysis tests benchmarks figures examples
	$(VPY) -m pytest -q

bench: $(STAMP)
	$(VPY) benchmarks/penalty_overhead.py

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) site runs
