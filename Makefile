# Every target creates its own virtual environment and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

KAFKA_PORT ?= 19092
KAFKA_DIR  ?= var/kafka

.PHONY: venv run lint test test-unit test-integration test-kafka kafka kafka-stop bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	touch $(STAMP)

venv: $(STAMP)

## make run: embedded broker + service + a modest synthetic stream; snapshots print as windows close
run: $(STAMP)
	PY=$(PY) bash scripts/demo.sh

## make lint: ruff (rules in pyproject.toml) over the code and tests; mypy on the package
## (strict on aggregator.core and aggregator.spill)
lint: $(STAMP)
	$(VENV)/bin/ruff check aggregator tests tools
	$(VENV)/bin/mypy

## make test: lint, then the whole suite (unit, integration against the embedded broker, crash tests)
test: $(STAMP) lint
	$(PY) -m pytest -q -p no:cacheprovider

## make test-unit: tests/unit, no broker and no service process (seconds)
test-unit: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

## make test-integration: tests/integration, against the embedded broker
test-integration: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/integration

## make kafka: a single-node Apache Kafka 4.x (KRaft) on 127.0.0.1:$(KAFKA_PORT), jars from Maven Central
## (fetched once into ~/.cache/aggregator-kafka); prints the bootstrap address. Idempotent.
kafka:
	@bash scripts/kafka.sh start --port $(KAFKA_PORT) --dir $(KAFKA_DIR)

kafka-stop:
	@bash scripts/kafka.sh stop --dir $(KAFKA_DIR)

## make test-kafka: the integration suite against that real Kafka (started if needed, left running)
test-kafka: $(STAMP)
	@bash scripts/kafka.sh start --port $(KAFKA_PORT) --dir $(KAFKA_DIR) >/dev/null
	AGG_TEST_BROKER=kafka AGG_TEST_KAFKA=127.0.0.1:$(KAFKA_PORT) $(PY) -m pytest -q -p no:cacheprovider tests/integration -rs

## make bench: worker throughput vs a bare consumer, HTTP ingest, snapshot delay, memory (medians of 3);
## prints a table and writes docs/benchmarks.md.  Smaller: make bench BENCH_ARGS="--n 200000 --memory-n 0"
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m tools.bench $(BENCH_ARGS)

clean:
	-bash scripts/kafka.sh stop --dir $(KAFKA_DIR)
	rm -rf $(VENV) var *.egg-info
