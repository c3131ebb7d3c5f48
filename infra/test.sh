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

# The whole suite in two lanes of about equal length, which share nothing: the backfill suite (its own SeaweedFS,
# Airflow home and scheduler; one DAG run after another) then the cluster profile's smoke run (its own PostgreSQL,
# Redis, Celery workers and Spark standalone) in one; everything else in the other.
side_log="$REKI_HOME/.reki/logs/test-backfill.log"
mkdir -p "$(dirname "$side_log")"
echo "==> the backfill suite and the cluster smoke run go alongside the others; their output: $side_log (printed at the end)"
side_lane() {
  "${PYTEST[@]}" -m backfill tests; check $? "-m backfill"; local backfill_rc=$?
  "${PYTEST[@]}" -m cluster_smoke tests; check $? "-m cluster_smoke"; local smoke_rc=$?
  echo "==> backfill suite exit $backfill_rc, cluster smoke run exit $smoke_rc"
  [ "$backfill_rc" -eq 0 ] && [ "$smoke_rc" -eq 0 ]
}
main_log="$REKI_HOME/.reki/logs/test-main.log"
side_lane >"$side_log" 2>&1 &
side_pid=$!
# The main lane prints as it goes, and keeps a copy so that its failures can be repeated last (CI shows the tail).
( "${PYTEST[@]}" -m "not backfill and not cluster_smoke" tests 2>&1 | tee "$main_log" ) &
main_pid=$!
# A stopped run (Ctrl-C, a CI timeout) still tears both down: tests/conftest.py turns SIGTERM into an interrupt.
trap 'pkill -TERM -P $side_pid 2>/dev/null; pkill -TERM -f "pytest.*not backfill and not cluster_smoke" 2>/dev/null; kill -TERM $main_pid $side_pid 2>/dev/null' INT TERM
wait $main_pid
rc=$?
wait $side_pid
side_rc=$?
echo "==> backfill suite and cluster smoke run (-m backfill; -m cluster_smoke), exit $side_rc:"
cat "$side_log"
echo "==> main lane (-m 'not backfill and not cluster_smoke'), exit $rc; its summary again:"
sed -n '/short test summary info/,$p' "$main_log" | grep -vE '^(SKIPPED|XFAIL)' || tail -n 5 "$main_log"
check $rc "-m 'not backfill and not cluster_smoke'" || exit $?
exit "$side_rc"
