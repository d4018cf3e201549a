# README's two commands: `make demo` and `make test`. Each creates .venv and installs on first use.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: demo test lint bench docs browser clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(VPY) -m pip install -q -e '.[dev,docs,cluster]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ex2l demo --out runs/demo

# The audit report's test and the docs site's test open pages in a real headless browser (Debian's chromium);
# without one those two tests are skipped with their reason.
browser:
	@command -v chromium >/dev/null || command -v google-chrome >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "no chromium: the report's and the docs' browser tests will be skipped"

lint: $(STAMP)
	$(VPY) -m ruff check ex2l_xai analysis tests benchmarks figures examples docs/_hooks

test: $(STAMP) browser lint docs
	$(VPY) -m pytest -q

# OpenMP waits passively, as under `ex2l` (docs/performance.md: spinning threads distort timings on a shared CPU)
bench: export OMP_WAIT_POLICY ?= PASSIVE
bench: $(STAMP)
	$(VPY) benchmarks/penalty_overhead.py
	$(VPY) benchmarks/extract_throughput.py
	$(VPY) benchmarks/extract_batch.py
	$(VPY) benchmarks/mmd_memory.py
	$(VPY) benchmarks/data_throughput.py
	$(VPY) benchmarks/faithfulness_cost.py

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet -d site

clean:
	rm -rf $(VENV) site runs
