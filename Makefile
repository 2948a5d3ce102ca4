# One command to run, one to test. Both build .venv from nothing on first use.
PYTHON ?= $(shell for p in python3.13 $$HOME/.pyenv/versions/3.13*/bin/python3.13 /usr/local/bin/python3.13 /usr/bin/python3.13; do \
	$$p -c 'import sys; assert sys.version_info >= (3, 13)' 2>/dev/null && { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The dashboard's chart library: `npm ci` against the committed lock file, copied into the
# package's git-ignored vendor folder (pyproject ships it when present).
VENDOR := marketflow/dashboard/vendor
VENDOR_STAMP := $(VENDOR)/.installed
CHART_DIST := node_modules/lightweight-charts/dist/lightweight-charts.standalone.production.mjs

.PHONY: run test lint bench venv clean simulate chart-library browser screenshot

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python >= 3.13 is needed (see README)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

$(VENDOR_STAMP): package.json package-lock.json
	@command -v npm >/dev/null 2>&1 || { \
		echo "npm is needed for the dashboard's chart library: install Node.js and npm"; exit 1; }
	npm ci --no-audit --no-fund --loglevel=error
	mkdir -p $(VENDOR)
	cp $(CHART_DIST) $(VENDOR)/lightweight-charts.mjs
	cp node_modules/lightweight-charts/LICENSE $(VENDOR)/LICENSE
	touch $@

# `make run` starts without it (the page then says "chart library not installed").
chart-library:
	@$(MAKE) --no-print-directory $(VENDOR_STAMP) || \
		echo "the dashboard will run without its chart library (it says so on the page)"

# Browser tests drive Debian's chromium: installed here when missing and possible (root or
# sudo without a password); otherwise the browser tests stop, saying what to install.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" -eq 0 ]; then SUDO=; \
		elif sudo -n true 2>/dev/null; then SUDO=sudo; \
		else echo "browser tests need Debian's chromium: sudo apt-get install chromium"; exit 0; fi; \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium \
			|| echo "browser tests need Debian's chromium: apt-get install chromium (failed here)"; }

run: $(STAMP) chart-library
	$(BIN)/marketflow --mode test

simulate: $(STAMP)
	$(BIN)/marketflow simulate

test: $(STAMP) $(VENDOR_STAMP) browser
	$(BIN)/ruff check marketflow tests benchmarks
	$(BIN)/ruff format --check marketflow tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -n auto -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check marketflow tests benchmarks
	$(BIN)/ruff format --check marketflow tests benchmarks
	$(BIN)/mypy

# wrk (the HTTP load generator of benchmarks/bench_api.py) comes from apt when it is missing,
# py-spy (its profiles) from PyPI into the venv; chromium (the dashboard's figures) as for tests.
bench: $(STAMP) $(VENDOR_STAMP) browser
	@command -v wrk >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q wrk; }
	@test -x $(BIN)/py-spy || $(BIN)/python -m pip install -q py-spy
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

# docs/dashboard.png: headless chromium against a test-mode marketflow it starts and stops.
screenshot: $(STAMP) $(VENDOR_STAMP) browser
	$(BIN)/python -m tests.browser.screenshot docs/dashboard.png

clean:
	rm -rf $(VENV) build *.egg-info node_modules $(VENDOR)
