# One command to run, one to test. Both build .venv from nothing on first use.
PYTHON ?= $(shell for p in python3.13 $$HOME/.pyenv/versions/3.13*/bin/python3.13 /usr/local/bin/python3.13 /usr/bin/python3.13; do \
	$$p -c 'import sys; assert sys.version_info >= (3, 13)' 2>/dev/null && { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench venv clean simulate

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python >= 3.13 is needed (see README)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/marketflow --mode test

simulate: $(STAMP)
	$(BIN)/marketflow simulate

test: $(STAMP)
	$(BIN)/ruff check marketflow tests benchmarks
	$(BIN)/ruff format --check marketflow tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -n auto -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check marketflow tests benchmarks
	$(BIN)/ruff format --check marketflow tests benchmarks
	$(BIN)/mypy

# wrk (the HTTP load generator of benchmarks/bench_api.py) comes from apt when it is missing,
# py-spy (its profiles) from PyPI into the venv.
bench: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q wrk; }
	@test -x $(BIN)/py-spy || $(BIN)/python -m pip install -q py-spy
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
