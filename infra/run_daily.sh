#!/usr/bin/env bash
# Run reki_daily_refresh for one date through real Airflow (`airflow dags test`), then print the summary.
# Usage: infra/run_daily.sh [YYYY-MM-DD]   (default: run_date in conf/reki.yaml)
set -euo pipefail
umask 077  # the run's log and what the tasks write are their owner's alone
source "$(dirname "$0")/env.sh"
DT="${1:-${REKI_RUN_DATE:-$(python -c 'from reki_core.config import load_config; print(load_config().run_date)')}}"
LOG="$REKI_HOME/.reki/logs/daily-$DT.log"; mkdir -p "$(dirname "$LOG")"
echo "==> reki_daily_refresh for dt=$DT through Airflow (log: $LOG)"
start=$(date +%s)
if ! airflow dags test reki_daily_refresh "$DT" > "$LOG" 2>&1; then
  echo "ERROR: the DAG run failed; last lines of $LOG:"; { grep -E "ERROR|Error|error|Traceback|failed" "$LOG" || tail -25 "$LOG"; } | tail -25
  reki summary --dt "$DT" || true
  exit 1
fi
if ! grep -q "state=success" "$LOG"; then
  echo "ERROR: the DAG run did not succeed; see $LOG"; { grep -E "ERROR|failed|upstream_failed" "$LOG" || true; } | tail -25; exit 1
fi
reki summary --dt "$DT"
echo "==> done in $(( $(date +%s) - start ))s (Airflow log: $LOG)"
