# The two commands of the README: `make run` and `make test`. Both set themselves up, each with
# what it needs: `run` the gateway and the local provider, `test` the test tooling as well.
PYTHON     ?= python3
VENV       := .venv
BIN        := $(VENV)/bin
RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test lint typecheck unit unit-compiled compiled redis-server chromium bench bench-smoke \
        bench-ceiling clean

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

# The hot path compiled with mypyc (issue 14), into a copy of the sources: build/compiled/. The
# sources stay pure Python (what `make run` and the unit tests run; no extension module can shadow
# an edit). The benchmarks run tenebra from the copy (BENCH_COMPILED), and unit-compiled runs the
# tests of the compiled modules against it. Not compiled: modules that define msgspec Structs
# (mypyc builds a subclass as a plain class and loses its options). A compiled module never
# awaits in an exception handler (mypyc leaves the exception current for every other coroutine
# meanwhile; see UpstreamLink._connection). The copy records a digest of the sources it was built from: the
# benchmarks never run a copy built from other sources. Where there is no C compiler, the
# benchmarks say they ran pure Python and the compiled tests skip; a mypyc error fails the build.
COMPILED_DIR     := build/compiled
export BENCH_COMPILED := $(abspath $(COMPILED_DIR))
COMPILED_MODULES := gateway/tasks.py gateway/store/memory.py gateway/dispatch.py gateway/pool.py \
                    gateway/sessions.py gateway/clients.py gateway/upstream.py gateway/metrics.py \
                    gateway/intake.py gateway/quotas.py gateway/admission.py gateway/recovery.py \
                    gateway/console/producer.py gateway/console/bounded.py gateway/audit.py \
                    gateway/replication.py gateway/store/redis.py gateway/store/connection.py \
                    gateway/store/pipe.py gateway/store/states.py gateway/wsmsg.py \
                    protocol/codec.py protocol/validate.py
COMPILED_TESTS   := tests/protocol tests/gateway/test_tasks.py tests/gateway/test_dispatch.py \
                    tests/gateway/test_clients.py tests/gateway/test_sessions.py \
                    tests/gateway/test_pool.py tests/gateway/test_upstream.py \
                    tests/gateway/test_multiplexing.py tests/gateway/test_quotas.py \
                    tests/gateway/test_metrics.py tests/gateway/store/test_memory.py \
                    tests/gateway/test_recovery.py tests/gateway/test_resilience.py \
                    tests/gateway/test_rest.py tests/gateway/test_sdk.py \
                    tests/gateway/test_admission.py tests/gateway/console/test_bounded.py \
                    tests/gateway/console/test_console.py tests/gateway/test_audit.py \
                    tests/gateway/console/test_producer.py \
                    tests/gateway/test_replication.py tests/gateway/store/test_shared_contract.py \
                    tests/gateway/store/test_redis_tasks.py tests/gateway/store/test_pipe.py \
                    tests/gateway/test_roaming.py
SOURCES          := $(shell find gateway protocol -type f -not -path '*/__pycache__/*')

$(COMPILED_DIR)/.compiled: $(TEST_STAMP) $(SOURCES)
	rm -rf $(COMPILED_DIR) && mkdir -p $(COMPILED_DIR)
	cp -r gateway protocol $(COMPILED_DIR)/
	@if command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1; then \
	  echo "mypyc: compiling $(words $(COMPILED_MODULES)) modules into $(COMPILED_DIR)"; \
	  cd $(COMPILED_DIR) && { ../../$(BIN)/mypyc $(COMPILED_MODULES) >mypyc.log 2>&1 \
	    || { tail -20 mypyc.log; echo "mypyc failed (whole log: $(COMPILED_DIR)/mypyc.log)"; \
	         exit 1; }; } \
	  && rm -rf build .mypy_cache \
	  && PYTHONPATH=$(CURDIR) ../../$(BIN)/python -c \
	     "from bench.harness import source_digest as d; print(d())" > .compiled; \
	else echo "mypyc: no C compiler here: $(COMPILED_DIR) not built, tenebra runs pure Python"; fi

compiled: $(COMPILED_DIR)/.compiled

unit-compiled: compiled
	@if [ -f $(COMPILED_DIR)/.compiled ]; then \
	  rm -rf $(COMPILED_DIR)/tests && cp -r tests pyproject.toml $(COMPILED_DIR)/ \
	  && cd $(COMPILED_DIR) && ../../$(BIN)/pytest -q -p no:cacheprovider $(COMPILED_TESTS); \
	else echo "unit-compiled: skipped, $(COMPILED_DIR) was not built"; fi

test: lint typecheck unit unit-compiled bench-smoke

# The benchmarks measure tenebra as compiled (BENCH_COMPILED); the reports say which build ran.
bench: $(TEST_STAMP) compiled
	$(BIN)/python -m bench.protocol_codec
	$(BIN)/python -m bench.render
	$(BIN)/python -m bench.harness
	$(BIN)/python -m bench.console
	$(BIN)/python -m bench.audit

# A regression check for CI's 2 cores (under a minute): every path and scenario completes with
# zero errors and the report is written, the ceiling's against the echo provider included.
# Ratios and targets are read by people, not asserted.
bench-smoke: $(TEST_STAMP) compiled
	$(BIN)/python -m bench.harness --smoke
	$(BIN)/python -m bench.console --smoke
	$(BIN)/python -m bench.audit --smoke

# Issue 14 alone: the ceiling (echo provider, the process under test pinned to its own core),
# then a py-spy profile of tenebra at it (both written to bench/results/).
bench-ceiling: $(TEST_STAMP) compiled
	$(BIN)/python -m bench.harness --only ceiling
	$(BIN)/python -m bench.profile --ceiling

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis build
