# Sourced by the Makefile and scripts: the local stack's environment (no secrets are stored here;
# credentials are generated at set-up under .reki/secrets/ and exported from there).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export REKI_HOME="$ROOT"
export PATH="$ROOT/.venv/bin:$PATH"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$ROOT/.reki/airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
# plugins/ holds the `reki_airflow` glue package, imported from PYTHONPATH. It is not Airflow's
# plugins folder: Airflow imports each file there under its bare stem (a secrets.py would shadow stdlib).
export AIRFLOW__CORE__PLUGINS_FOLDER="$AIRFLOW_HOME/plugins"
export PYTHONPATH="$ROOT/plugins${PYTHONPATH:+:$PYTHONPATH}"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__EXECUTOR=LocalExecutor
export AIRFLOW__CORE__PARALLELISM=4
export AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG=2
export AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT=60
# The DAG files change with a deployment, not while the stack runs: parse each every 2 minutes, not Airflow's 30 s
# (each parse is a forked interpreter importing the DAG file: the dag-processor's CPU on a small machine).
export AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL="${AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL:-120}"
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="sqlite:///$AIRFLOW_HOME/airflow.db"
# Every Airflow process shares that one SQLite file: wait for its lock instead of failing after 5 s.
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS=reki_airflow.db.SQLITE_CONNECT_ARGS
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC=reki_airflow.db.SQLITE_CONNECT_ARGS_ASYNC
export AIRFLOW__API__HOST=127.0.0.1
export AIRFLOW__API__PORT="${AIRFLOW__API__PORT:-8080}"
export AIRFLOW__API__BASE_URL="http://127.0.0.1:$AIRFLOW__API__PORT"
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="http://127.0.0.1:$AIRFLOW__API__PORT/execution/"
export AIRFLOW__LOGGING__LOGGING_LEVEL=INFO
# Task logs are their owner's alone (Airflow's defaults are group-writable and world-readable).
export AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FOLDER_PERMISSIONS=0o700
export AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FILE_PERMISSIONS=0o600
export GX_ANALYTICS_ENABLED=false
export SPARK_LOCAL_IP=127.0.0.1
export PYSPARK_PYTHON="$ROOT/.venv/bin/python"
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
# Local credentials (writer identity, Spark Connect token) and their Airflow connections, from .reki/secrets (0600);
# a consumer's shell then runs `eval "$(reki env --role reader)"`, which swaps them for the read-only identity.
if [ -x "$ROOT/.venv/bin/reki" ]; then
  eval "$("$ROOT/.venv/bin/reki" env)"
fi
