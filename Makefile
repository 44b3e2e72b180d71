# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KSERVE_STAMP := .kserve-venv/.installed

.PHONY: demo test lint typecheck pytest system-deps proto clean bench bench-venv bench-drift-venvs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Mosquitto is needed by the tests that run against a real external broker; Chromium and its driver by the
# dashboard's browser tests (tests/test_dashboard_browser.py) and bench/dashboard.py: Debian's packages,
# since nothing may download a browser at run time. PostgreSQL (initdb, pg_ctl) by the registry tests: they
# use EDGEFED_TEST_POSTGRES or the local service on 5432, else start a server of their own (tests/pg_server.py).
system-deps:
	@missing=; \
	{ command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; } || missing="$$missing mosquitto"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/bin/chromedriver ] || missing="$$missing chromium-driver"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	[ -z "$$missing" ] || { \
	  echo "installing$$missing (apt-get)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing >/dev/null; }

demo: $(STAMP)
	$(BIN)/python examples/quickstart/run_demo.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check edge_agent cloud_hub model_compiler device_profiles

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) system-deps $(KSERVE_STAMP)
	$(BIN)/pytest -q --durations=25

test: lint typecheck pytest

# KServe (the peer of tests/test_kserve_cloud.py and bench/cloud.py) pins its own dependencies: a venv of
# its own, from tests/kserve_requirements.txt (about 70 s on a fresh machine).
$(KSERVE_STAMP): tests/kserve_requirements.txt
	$(PYTHON) -m venv .kserve-venv
	.kserve-venv/bin/pip install --quiet -r tests/kserve_requirements.txt
	touch $(KSERVE_STAMP)

bench-venv: $(KSERVE_STAMP)

# The peers of bench/drift.py pin clashing dependencies: a venv each (bench/drift.py skips a missing one).
bench-drift-venvs:
	$(PYTHON) -m venv .bench-venvs/alibi && .bench-venvs/alibi/bin/pip install --quiet alibi-detect==0.13.0
	$(PYTHON) -m venv .bench-venvs/evidently && .bench-venvs/evidently/bin/pip install --quiet evidently==0.7.23 'pandas<3'

bench: $(STAMP) system-deps
	$(BIN)/python bench/compiler.py
	$(BIN)/python bench/sdk_overhead.py
	$(BIN)/python bench/cloud.py
	$(BIN)/python bench/failover.py
	$(BIN)/python bench/fanout.py
	$(BIN)/python bench/fleet.py
	$(BIN)/python bench/rollout.py
	$(BIN)/python bench/convergence.py
	$(BIN)/python bench/telemetry.py
	$(BIN)/python bench/telemetry_soak.py
	$(BIN)/python bench/drift.py
	$(BIN)/python bench/dashboard.py

# grpcio-tools lives in its own venv: it pins a protobuf newer than tritonclient allows.
proto:
	$(PYTHON) -m venv .protoc-venv && .protoc-venv/bin/pip install --quiet grpcio-tools
	.protoc-venv/bin/python -m grpc_tools.protoc -I edge_agent/protocol/oip \
	  --descriptor_set_out=edge_agent/protocol/oip/grpc_predict_v2.desc edge_agent/protocol/oip/grpc_predict_v2.proto

clean:
	rm -rf $(VENV) demo-work .mypy_cache .ruff_cache .pytest_cache
