#!/usr/bin/env bash
# The whole suite: unit, spark, dags, integration (real SeaweedFS, Airflow, Spark). GPU tests skip without CUDA.
set -uo pipefail
umask 077  # as `make`: the stacks the tests start write owner-only files (the security checks assert it)
source "$(dirname "$0")/env.sh"
cd "$REKI_HOME"
# Tests bring their own object store and credentials: never the ones `make run` exported.
unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_ENDPOINT_URL AWS_DEFAULT_REGION AIRFLOW_CONN_AWS_DEFAULT
unset SPARK_CONNECT_AUTHENTICATE_TOKEN AIRFLOW_CONN_SPARK_CONNECT_DEFAULT  # and their own Spark Connect server
# Tests get their own Airflow home so they never touch the one `make run` uses.
export AIRFLOW_HOME="$REKI_HOME/.reki/airflow-test"
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="sqlite:///$AIRFLOW_HOME/airflow.db"
mkdir -p "$AIRFLOW_HOME"
bash "$REKI_HOME/infra/airflow.sh" init || exit 1

PYTEST=(python -m pytest -p no:cacheprovider -q -ra --durations=15 --timeout=900)

# pytest's exit 5 (nothing collected) is a failure here: a marker or path typo must not pass.
check() { [ "$1" -eq 5 ] && { echo "ERROR: no tests were collected ($2)"; return 1; }; return "$1"; }

if [ $# -gt 0 ]; then
  # Options alone (`-m faults`) select from the whole tree; a path given (`tests/spark`, `file.py::test`) is the selection.
  where=(tests)
  for arg in "$@"; do [ -e "${arg%%::*}" ] && where=(); done
  "${PYTEST[@]}" "$@" "${where[@]}"
  check $? "$*"
  exit $?
fi

# The whole suite, its modules spread over workers (pytest-xdist): the long suites wait on Airflow's scheduler and on
# server starts, which the other workers fill (3 workers on 2 cores: 30 min against 38 for two lanes, docs/design.md).
# A module stays on one worker (its module fixtures start once) and modules go out in collection order, which puts
# the long integration suites first.
"${PYTEST[@]}" -n "${REKI_TEST_WORKERS:-3}" --dist loadscope --no-loadscope-reorder tests &
suite=$!
# A stopped run (Ctrl-C, a CI timeout) still tears down what the workers started: tests/conftest.py turns SIGTERM into
# an interrupt, so each worker's fixtures stop their servers.
trap 'pkill -TERM -P $suite 2>/dev/null; kill -TERM $suite 2>/dev/null' INT TERM
wait $suite
rc=$?
[ "$rc" -gt 128 ] && { wait $suite; rc=$?; }  # interrupted: wait for the teardown to end
check $rc "the whole suite"
