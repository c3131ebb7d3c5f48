#!/usr/bin/env bash
# The whole suite: unit, spark, dags, integration (real SeaweedFS, Airflow, Spark). GPU tests skip without CUDA.
set -uo pipefail
source "$(dirname "$0")/env.sh"
cd "$REKI_HOME"
# Tests bring their own object store and credentials: never the ones `make run` exported.
unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_ENDPOINT_URL AWS_DEFAULT_REGION AIRFLOW_CONN_AWS_DEFAULT
# Tests get their own Airflow home so they never touch the one `make run` uses.
export AIRFLOW_HOME="$REKI_HOME/.reki/airflow-test"
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="sqlite:///$AIRFLOW_HOME/airflow.db"
mkdir -p "$AIRFLOW_HOME"
bash "$REKI_HOME/infra/airflow.sh" init || exit 1
python -m pytest -p no:cacheprovider -q -ra --durations=15 --timeout=900 "$@" tests
rc=$?
[ $rc -eq 5 ] && { echo "ERROR: no tests were collected"; exit 1; }
exit $rc
