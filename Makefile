# Two commands on a fresh machine:
#   make demo   - set up .venv and run the main job (small zoo -> campaign -> export) on SQLite
#   make test   - set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.olmopt-installed

.PHONY: install demo test lint clean-storage

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: any other spec pulls a multi-GB CUDA build on CPU-only machines
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	OLMOPT_THREADS=$${OLMOPT_THREADS:-2} ./scripts/demo.sh

# two worker processes: the suite is mostly one-thread torch work, and a 2-vCPU machine runs it in
# about 60 % of the serial time (BENCHMARKS.md "README's test command on two pytest workers")
test: $(STAMP)
	$(PY) -m pytest -q -n 2

lint: $(STAMP)
	$(VENV)/bin/ruff format --check olmopt tests benchmarks scripts
	$(VENV)/bin/ruff check olmopt tests benchmarks scripts
	$(VENV)/bin/mypy olmopt

clean-storage:
	rm -rf storage/olmopt.db storage/olmopt.db.lock storage/artifacts storage/merged-*
