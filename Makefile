# The two commands of the README: `make run` and `make test`. Both set themselves up, each with
# what it needs: `run` the gateway and the local provider, `test` the test tooling as well.
PYTHON     ?= python3
VENV       := .venv
BIN        := $(VENV)/bin
RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test lint typecheck unit redis-server chromium bench bench-smoke bench-ceiling clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[provider]'
	touch $(RUN_STAMP)

# A superset of run's: it satisfies run's stamp too.
$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[provider,test]'
	touch $(RUN_STAMP) $(TEST_STAMP)

run: $(RUN_STAMP)
	$(BIN)/tenebra serve $(ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(TEST_STAMP)
	$(BIN)/mypy

unit: $(TEST_STAMP) redis-server chromium
	$(BIN)/pytest -q $(PYTEST_ARGS)

# The Redis store's tests start a real redis-server (tests/gateway/store/conftest.py): installed
# here where it is missing, as root with apt-get (Debian). Where it cannot be, those tests skip
# and say why; the build goes on.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing redis-server (apt-get) for the Redis store tests"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends redis-server >/dev/null; } \
	      || echo "redis-server: apt-get failed; the Redis store tests will skip"; \
	  else \
	    echo "redis-server: not on PATH and not installable here (root and apt-get needed);" \
	      "the Redis store tests will skip"; \
	  fi; }

# The console's browser tests (tests/gateway/console/) drive a headless Chromium: the OS package,
# installed here where it is missing, as root with apt-get (Debian), with a font for its pages.
# Playwright launches it by its path: no browser is downloaded at run time. Where it cannot be
# installed, those tests skip and say why; the build goes on.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt-get) for the console's browser tests"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; } \
	      || echo "chromium: apt-get failed; the browser tests will skip"; \
	  else \
	    echo "chromium: not on PATH and not installable here (root and apt-get needed);" \
	      "the browser tests will skip"; \
	  fi; }

test: lint typecheck unit bench-smoke

bench: $(TEST_STAMP)
	$(BIN)/python -m bench.protocol_codec
	$(BIN)/python -m bench.render
	$(BIN)/python -m bench.harness
	$(BIN)/python -m bench.console
	$(BIN)/python -m bench.audit

# A regression check for CI's 2 cores (under a minute): every path and scenario completes with
# zero errors and the report is written, the ceiling's against the echo provider included.
# Ratios and targets are read by people, not asserted.
bench-smoke: $(TEST_STAMP)
	$(BIN)/python -m bench.harness --smoke
	$(BIN)/python -m bench.console --smoke
	$(BIN)/python -m bench.audit --smoke

# Issue 14 alone: the ceiling (echo provider, the process under test pinned to its own core),
# then a py-spy profile of tenebra at it (both written to bench/results/).
bench-ceiling: $(TEST_STAMP)
	$(BIN)/python -m bench.harness --only ceiling
	$(BIN)/python -m bench.profile --ceiling

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
