# REKI Pipeline: `make run` (the daily refresh on the embedded default) and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
STATE := .reki
# umask 077: what the stack writes under .reki/ (logs, databases, data, generated files) is its owner's alone.
WITH_ENV := umask 077 && source infra/env.sh &&

.PHONY: help run test test-faults test-backfill test-cluster bench setup airflow cluster stop clean prereqs

help:
	@echo "make run     - set up (first time) and run the daily refresh for conf/reki.yaml's run_date"
	@echo "make test    - the test suite (unit, spark, dags, integration, fault injection and backfills with real Airflow/Spark/SeaweedFS)"
	@echo "make test-faults / test-backfill - the fault-injection suite alone; the backfill suite alone"
	@echo "make airflow - start Airflow (UI on http://127.0.0.1:8080) and SeaweedFS; make stop stops them"
	@echo "make bench   - benchmarks -> bench/results/"
	@echo "make cluster - the cluster profile: PostgreSQL, Celery (Redis) workers, Spark standalone, SeaweedFS (docs/cluster.md)"
	@echo "make test-cluster - the cluster profile's whole suite (make test runs its smoke test)"

prereqs:
	@PYTHON=$(PYTHON) bash infra/check_prereqs.sh

# The venv is rebuilt only when the pinned requirements change. uv installs the locked set (requirements.lock, as
# constraints) in about a minute, where pip took about three (docs/design.md); pip stays in the venv for `pip download`.
# --system-certs: the platform's trust store, not uv's own CA bundle (a registry behind a TLS-inspecting proxy is trusted there).
UV_PIP := $(VENV)/bin/uv pip install --quiet --system-certs --python $(VENV)/bin/python
$(STAMP): requirements.txt requirements.lock pyproject.toml
	@PYTHON=$(PYTHON) bash infra/check_prereqs.sh
	@echo "==> creating $(VENV) and installing the pinned stack (first time: a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check uv==0.13.10
	$(UV_PIP) -r requirements.txt -c requirements.lock
	@# The Spark provider pulls pyspark-client, which overwrites pyspark's files: put pyspark back (its pin, as the images read it).
	$(UV_PIP) --reinstall --no-deps "$$(grep -E '^pyspark==' requirements.txt)"
	$(UV_PIP) --no-deps -e .
	touch $(STAMP)

setup: prereqs $(STAMP)
	@$(WITH_ENV) reki setup
	@$(WITH_ENV) bash infra/airflow.sh init

run: setup
	@$(WITH_ENV) reki stack up
	@$(WITH_ENV) bash infra/run_daily.sh

test: setup
	@bash infra/cluster/install.sh  # the cluster profile's smoke test needs PostgreSQL and Redis
	@$(WITH_ENV) bash infra/test.sh

test-faults: setup
	@$(WITH_ENV) bash infra/test.sh -m faults

test-backfill: setup
	@$(WITH_ENV) bash infra/test.sh -m backfill

bench: setup
	@$(WITH_ENV) bash infra/bench.sh

airflow: setup
	@$(WITH_ENV) reki stack up
	@$(WITH_ENV) bash infra/airflow.sh start

# The cluster profile: no SQLite and no embedded Airflow home on its path (`setup` would initialise both).
cluster: prereqs $(STAMP)
	@bash infra/cluster/install.sh
	@$(WITH_ENV) reki setup
	@$(WITH_ENV) python -m reki_core.cluster up

test-cluster: prereqs $(STAMP)
	@bash infra/cluster/install.sh
	@$(WITH_ENV) reki setup
	@$(WITH_ENV) bash infra/test.sh -m "cluster or cluster_smoke"

stop:
	@if [ -x $(VENV)/bin/reki ]; then $(WITH_ENV) bash infra/airflow.sh stop; $(WITH_ENV) reki stack down; \
	  $(WITH_ENV) python -m reki_core.cluster down; fi

clean: stop
	rm -rf $(STATE)/lake $(STATE)/airflow $(STATE)/seaweedfs
