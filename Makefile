# `make demo` and `make test` each set up .venv on a fresh machine, then run. `make test` also installs the
# Debian packages its integration tests need (PostgreSQL, Chromium) where it runs as root with apt-get, and
# names the tests that will be skipped where it cannot (scripts/system-packages).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.geopose-installed

.PHONY: demo test lint bench clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/geopose-ml demo --workdir demo_work

test: $(STAMP)
	scripts/system-packages
	$(BIN)/ruff check geopose_mlops tests bench
	$(BIN)/python -m pytest -v -ra --durations=15

lint: $(STAMP)
	$(BIN)/ruff check geopose_mlops tests bench

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf demo_work mlruns .pytest_cache
