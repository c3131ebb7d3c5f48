#!/usr/bin/env bash
# `airflow backfill create` for the daily DAG, retried when the embedded SQLite metadata DB reports
# "database is locked": a backfill created while the scheduler writes can hit SQLite's snapshot
# conflict, which fails at once (no busy timeout waits it out). Airflow deletes the partial backfill on
# that error, so a retry starts clean. On Postgres/MySQL the first try is the only one.
# Usage: infra/backfill.sh FROM_DATE TO_DATE [more `airflow backfill create` options]
#   e.g. infra/backfill.sh 1998-03-01 1998-03-07 --reprocess-behavior failed
set -uo pipefail
source "$(dirname "$0")/env.sh"
[ $# -ge 2 ] || { echo "usage: $0 FROM_DATE TO_DATE [airflow backfill create options]" >&2; exit 2; }
from=$1 to=$2; shift 2
dag=${REKI_DAG_ID:-reki_daily_refresh}
for attempt in 1 2 3 4 5; do
  out=$(airflow backfill create --dag-id "$dag" --from-date "$from" --to-date "$to" --max-active-runs 1 "$@" 2>&1)
  rc=$?
  echo "$out"
  if [ $rc -eq 0 ] || ! grep -q "database is locked" <<<"$out"; then exit $rc; fi
  echo "backfill create: metadata DB busy (attempt $attempt of 5), retrying in $((attempt * 5)) s" >&2
  sleep $((attempt * 5))
done
exit $rc
