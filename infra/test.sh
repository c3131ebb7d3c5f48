#!/usr/bin/env bash
# The whole suite: unit, spark, dags, integration (real SeaweedFS, Airflow, Spark). GPU tests skip without CUDA.
set -uo pipefail
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

# The whole suite. The backfill suite (its own SeaweedFS, Airflow home and scheduler; about 17 min here,
# mostly one DAG run after another) runs beside the others, which share nothing with it.
backfill_log="$REKI_HOME/.reki/logs/test-backfill.log"
mkdir -p "$(dirname "$backfill_log")"
echo "==> the backfill suite runs alongside the others; its output: $backfill_log (printed at the end)"
"${PYTEST[@]}" -m backfill tests >"$backfill_log" 2>&1 &
backfill_pid=$!
# The backfill suite is the longer one (one DAG run after another): the others yield the CPU to it.
nice -n 10 "${PYTEST[@]}" -m "not backfill" tests &
main_pid=$!
# A stopped run (Ctrl-C, a CI timeout) still tears both down: tests/conftest.py turns SIGTERM into an interrupt.
trap 'kill -TERM $main_pid $backfill_pid 2>/dev/null' INT TERM
wait $main_pid
rc=$?
wait $backfill_pid
backfill_rc=$?
echo "==> backfill suite (-m backfill), exit $backfill_rc:"
cat "$backfill_log"
check $rc "-m 'not backfill'" || exit $?
check $backfill_rc "-m backfill"
