#!/usr/bin/env bash
# Local Airflow (SQLite, LocalExecutor): init | start | stop | status. Components run as separate
# processes bound to 127.0.0.1, each restarted when it exits, with PIDs (of the process groups) in .reki/pids/.
# The embedded profile keeps Airflow's simple auth manager: one user, `admin`, on loopback; its generated password is
# in a 0600 file under .reki/secrets/ (`reki env` names it) and is never printed.
set -euo pipefail
umask 077  # every log, database and file the components write is their owner's alone
source "$(dirname "$0")/env.sh"
PIDS="${REKI_PIDS_DIR:-$REKI_HOME/.reki/pids}"; LOGS="${REKI_LOGS_DIR:-$REKI_HOME/.reki/logs}"
COMPONENTS=(api-server scheduler dag-processor triggerer)
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="admin:admin"
: "${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:?infra/env.sh sets it (reki env): run make setup first}"

init() {
  mkdir -p "$AIRFLOW_HOME" "$PIDS" "$LOGS"
  # What an earlier version left readable to others (the SQLite database, logs) becomes its owner's alone.
  chmod 700 "$AIRFLOW_HOME" "$PIDS" "$LOGS"
  find "$AIRFLOW_HOME" "$PIDS" "$LOGS" -perm /077 -exec chmod go-rwx {} + 2>/dev/null || true
  rm -f "$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"  # an old default file held the password in clear
  if [ ! -f "$AIRFLOW_HOME/.migrated" ] || [ "$AIRFLOW_HOME/.migrated" -ot "$REKI_HOME/requirements.txt" ]; then
    echo "==> initialising the Airflow metadata database (SQLite) in $AIRFLOW_HOME"
    airflow db migrate > "$LOGS/airflow-migrate.log" 2>&1 || { tail -20 "$LOGS/airflow-migrate.log"; exit 1; }
    touch "$AIRFLOW_HOME/.migrated"
  fi
  # Every task that may use CUDA (LLM shards, encoding, training, the adaptor) runs in this pool
  # (its size = concurrent GPU workers).
  airflow pools list -o plain 2>/dev/null | grep -q '^gpu' || airflow pools set gpu 1 "LLM extraction (GPU) workers" > /dev/null
  # Extraction shards that are clients of an LLM server (llm.backend: openai) hold no GPU: their own pool, sized in config.
  airflow pools set $(python -c 'from reki_core.config import load_config; c = load_config().llm; print(c.client_pool, c.client_pool_slots)') "LLM server clients (llm.client_pool)" > /dev/null
}

# A PID file holds the supervisor's PID (= its process group) and when it started (/proc/PID/stat field 22):
# after a reboot the same number may belong to another process, which must never be signalled as ours.
start_ticks() { local s; s=$(cat "/proc/$1/stat" 2>/dev/null) || return 0; s=${s##*) }; set -- $s; echo "${20}"; }
pid_of() { local pid _; read -r pid _ < "$PIDS/airflow-$1.pid"; echo "$pid"; }
# Ours while the group lives and its leader is either the process we started or gone (its group, still
# alive, keeps the number from being reused).
alive() {
  local f="$PIDS/airflow-$1.pid" pid start now; [ -f "$f" ] || return 1
  read -r pid start < "$f" || [ -n "${pid:-}" ] || return 1
  kill -0 -- "-$pid" 2>/dev/null || return 1
  now=$(start_ticks "$pid"); [ -z "$now" ] || [ -z "${start:-}" ] || [ "$now" = "$start" ]
}
# The venv's python, not curl: only Python and Java are required on the machine.
api_healthy() { python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
  "$AIRFLOW__API__BASE_URL/api/v2/monitor/health" >/dev/null 2>&1; }

start() {
  init
  for c in "${COMPONENTS[@]}"; do
    if alive "$c"; then echo "airflow $c already running (pid $(pid_of "$c"))"; continue; fi
    # Supervised like a systemd unit with Restart=always: the scheduler exits on an unhandled error (e.g. a
    # run deleted under it by a rolled-back backfill create); it comes back in seconds and resumes its runs.
    # The scheduler starts with the tasks' libraries imported (reki_airflow/scheduler.py): tasks fork from it.
    # No log server (Airflow binds it to every interface): the api-server reads the task logs from the files here.
    cmd=(airflow "$c"); if [ "$c" = scheduler ]; then cmd=(python -m reki_airflow.scheduler); fi
    case "$c" in scheduler|triggerer) cmd+=(--skip-serve-logs) ;; esac
    setsid bash -c 'while :; do "${@:2}"; echo "[reki] airflow $1 exited with $?; restarting in 5 s" >&2; sleep 5; done' \
      supervise "$c" "${cmd[@]}" > "$LOGS/airflow-$c.log" 2>&1 < /dev/null &
    echo "$! $(start_ticks $!)" > "$PIDS/airflow-$c.pid"
    if [ "$c" = api-server ]; then  # the other components talk to the API server: wait for it first
      for _ in $(seq 1 90); do api_healthy && break; sleep 1; done
      if ! api_healthy; then  # stop its restart loop too: a later start must not find it "already running"
        kill -TERM -- "-$(pid_of "$c")" 2>/dev/null || true; rm -f "$PIDS/airflow-$c.pid"
        echo "api-server did not come up (port taken?); see $LOGS/airflow-api-server.log"; exit 1
      fi
    fi
  done
  echo "Airflow UI: $AIRFLOW__API__BASE_URL  user: admin  password: in $AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"
  echo "Logs in $LOGS; stop with: make stop"
}

stop() {
  for c in "${COMPONENTS[@]}"; do
    f="$PIDS/airflow-$c.pid"; [ -f "$f" ] || continue
    pid=$(pid_of "$c")
    if alive "$c"; then
      # The whole group: the supervisor exits at once, the component and its workers may take a while.
      kill -TERM -- "-$pid" 2>/dev/null || true
      for _ in $(seq 1 30); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
      kill -0 -- "-$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null
      echo "airflow $c stopped"
    fi
    rm -f "$f"
  done
}

status() { for c in "${COMPONENTS[@]}"; do alive "$c" && echo "$c: running" || echo "$c: stopped"; done; }

"${1:-status}"
