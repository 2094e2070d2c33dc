# The common verbs. `make demo` and `make test` are the README's quick start: each builds the virtualenv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-check bench-baseline clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fastworker demo

lint: $(STAMP)
	$(BIN)/ruff check fastworker tests bench
	$(BIN)/mypy fastworker

# Every test on the embedded Valkey, then the server-backed ones again on Redis when redis-server is installed.
test: lint
	$(BIN)/pytest
	@if command -v redis-server >/dev/null; then \
		echo "== server tests again on $$(redis-server --version | cut -d' ' -f1-3)"; \
		FASTWORKER_SERVER_BIN=redis-server $(BIN)/pytest -m server; \
	elif [ -n "$$CI" ]; then echo "CI needs redis-server installed" >&2; exit 1; \
	else echo "redis-server not found: server tests ran on Valkey only"; fi

# The whole table (throughput, peers, latency): minutes, on a quiet machine.
bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench

# Hot-path micro-benchmarks against the stored baseline: fails when one got slower by more than the margin.
BENCH_GATE := $(BIN)/pytest bench/test_hotpath.py -p no:cacheprovider --benchmark-storage=file://bench/baseline \
	--benchmark-columns=min,median,ops --benchmark-sort=name
bench-check: $(STAMP)
	$(BENCH_GATE) --benchmark-compare --benchmark-compare-fail=min:25%

bench-baseline: $(STAMP)
	$(BENCH_GATE) --benchmark-save=baseline

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
