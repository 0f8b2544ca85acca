# Two commands: `make serve` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Test files run in this many processes (pytest-xdist; a file's tests stay in one process, so
# module fixtures are made once). Much of the suite waits on nodes and peers, so 2 halves it on 2 cores.
TEST_WORKERS ?= 2

.PHONY: serve test venv migrate bench clean

venv: $(STAMP)

# Re-install when the declared dependencies change.
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

migrate: $(STAMP)
	$(BIN)/dicom-node db upgrade

serve: migrate
	$(BIN)/dicom-node serve

test: $(STAMP)
	$(BIN)/python -m pytest -ra -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/ingest.py

clean:
	rm -rf $(VENV) var build *.egg-info
