"""The same 7-day backfill on the embedded profile (SQLite, LocalExecutor, Spark Connect on local[2]) and on the
cluster profile (PostgreSQL, Celery workers on a default and a gpu queue, Spark Connect on a standalone master),
one after the other in one run, each on fresh state, its own ports and its own SeaweedFS.

For each profile: the wall time from `backfill create` to the last day's success, each day's run time, the
per-task queue wait (queued -> started, from the REST API's task instances: p50, p95), where the task time went
(summed by task), and whether the two profiles' published vector files are the same bytes for each day.

    .venv/bin/python bench/cluster.py [--days 7] [--start 1997-09-22]
writes bench/results/cluster.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reki_core.airflow_api import AirflowApi, states_of  # noqa: E402
from reki_core.config import PROJECT_ROOT  # noqa: E402
from reki_core.localstack import free_port_block  # noqa: E402

DAG_ID = "reki_daily_refresh"
# The integration tests' small but real settings (fewer tokens and epochs), one extraction shard a day.
FAST = {"REKI__LLM__SAMPLING__MAX_TOKENS": "12", "REKI__MODEL__MAX_EPOCHS": "2", "REKI__LLM__SHARD_SIZE": "100000",
        "REKI__MODEL__AUC_TOLERANCE_VS_BASELINE": "1.0"}


def _sh(env: dict[str, str], command: str, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-c", "source infra/env.sh && " + command], env=env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"`{command}` failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return proc


def _base_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AWS_", "REKI__"))}
    env.update(FAST)
    env.update({"REKI__PATHS__STATE_DIR": str(tmp / "state"), "REKI__PATHS__LAKE_URI": str(tmp / "lake"),
                "REKI__PATHS__DATA_DIR": str(PROJECT_ROOT / ".reki" / "data"),
                "REKI__PATHS__MODELS_DIR": str(PROJECT_ROOT / ".reki" / "models"),
                "REKI__OBJECT_STORE__BUCKET": "reki-bench"})
    return env


# The generated UI passwords (0600), written at set-up: the embedded profile's admin, the cluster profile's FAB users.
EMBEDDED_PASSWORDS, CLUSTER_PASSWORDS = "airflow_passwords.json", "cluster_airflow_users.json"


class Embedded:
    name = "embedded"

    def __init__(self, tmp: Path):
        base = free_port_block(16)
        self.env = _base_env(tmp)
        self.env.update({"REKI__OBJECT_STORE__ENDPOINT_URL": f"http://127.0.0.1:{base}",
                         "REKI__SPARK__CONNECT_URL": f"sc://localhost:{base + 12}",
                         "AIRFLOW_HOME": str(tmp / "airflow"), "AIRFLOW__API__PORT": str(base + 13),
                         # its own LLM server too: the default port is a user's `make run` stack's
                         "REKI__LLM__SERVER__PORT": str(base + 14),
                         "REKI_PIDS_DIR": str(tmp / "pids"), "REKI_LOGS_DIR": str(tmp / "logs")})
        self.port, self.secrets = base + 13, tmp / "state" / "secrets"

    def start(self) -> AirflowApi:
        _sh(self.env, "reki stack up && bash infra/airflow.sh start")
        return AirflowApi.with_password_file(f"http://127.0.0.1:{self.port}", self.secrets / EMBEDDED_PASSWORDS)

    def backfill(self, start: dt.date, end: dt.date) -> None:
        _sh(self.env, f"bash infra/backfill.sh {start} {end} --reprocess-behavior none")  # SQLite's retry

    def stop(self) -> None:
        _sh(self.env, "bash infra/airflow.sh stop; reki stack down")


class Cluster:
    name = "cluster"

    def __init__(self, tmp: Path):
        base = free_port_block(24)
        self.env = _base_env(tmp)
        self.env.update({
            "REKI__CLUSTER__POSTGRES_PORT": str(base), "REKI__CLUSTER__REDIS_PORT": str(base + 1),
            "REKI__CLUSTER__API_PORT": str(base + 2), "REKI__CLUSTER__SPARK_MASTER_PORT": str(base + 3),
            "REKI__CLUSTER__SPARK_MASTER_WEBUI_PORT": str(base + 4),
            "REKI__CLUSTER__SPARK_WORKER_WEBUI_PORT": str(base + 5),
            "REKI__SPARK__CONNECT_URL": f"sc://localhost:{base + 6}",
            "REKI__OBJECT_STORE__ENDPOINT_URL": f"http://127.0.0.1:{base + 10}"})
        self.port, self.secrets = base + 2, tmp / "state" / "secrets"

    def start(self) -> AirflowApi:
        _sh(self.env, "python -m reki_core.cluster up")
        return AirflowApi.with_password_file(f"http://127.0.0.1:{self.port}", self.secrets / CLUSTER_PASSWORDS)

    def backfill(self, start: dt.date, end: dt.date) -> None:
        _sh(self.env, "source infra/cluster/env.sh && airflow backfill create --dag-id reki_daily_refresh "
                      f"--from-date {start} --to-date {end} --max-active-runs 1 --reprocess-behavior none")

    def stop(self) -> None:
        _sh(self.env, "python -m reki_core.cluster down")


def _time(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def run_profile(profile, days: list[dt.date], tmp: Path) -> dict:
    t0 = time.perf_counter()
    api = profile.start()
    started_s = time.perf_counter() - t0
    try:
        api.unpause(DAG_ID)
        t0 = time.perf_counter()
        profile.backfill(days[0], days[-1])
        runs = api.wait_for_days(DAG_ID, days, timeout_s=5400, interval_s=3)
        wall_s = time.perf_counter() - t0
        if not all(s == "success" for s in states_of(runs).values()):
            raise RuntimeError(f"{profile.name}: the backfill did not succeed: {states_of(runs)}")
        waits, by_task, run_s = [], {}, {}
        for day in days:
            run = runs[day]
            run_s[day.isoformat()] = round((_time(run["end_date"]) - _time(run["start_date"])).total_seconds(), 1)
            tis = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}/taskInstances?limit=200")
            for ti in tis["task_instances"]:
                queued, start, end = _time(ti.get("queued_when")), _time(ti.get("start_date")), _time(ti.get("end_date"))
                if queued and start:
                    waits.append((start - queued).total_seconds())
                if start and end:
                    by_task[ti["task_id"]] = by_task.get(ti["task_id"], 0.0) + (end - start).total_seconds()
    finally:
        profile.stop()
    total_task_s = sum(by_task.values())
    return {
        "start_s": round(started_s, 1),
        "wall_s": round(wall_s, 1),
        "run_s": run_s,
        "queue_wait_s": {"p50": round(float(np.percentile(waits, 50)), 2), "p95": round(float(np.percentile(waits, 95)), 2),
                         "max": round(max(waits), 2), "n": len(waits)},
        "task_s_total": round(total_task_s, 1),
        # Wall time not spent inside a task: scheduling, queueing, the gaps between a run's tasks and between days.
        "outside_tasks_s": round(wall_s - total_task_s, 1),
        "task_s_top": {k: round(v, 1) for k, v in sorted(by_task.items(), key=lambda kv: -kv[1])[:6]},
        "vectors_sha256": {d.isoformat(): _vector_digests(tmp / profile.name / "lake", d) for d in days},
    }


def _vector_digests(lake: Path, day: dt.date) -> dict[str, str]:
    folder = lake / "vectors" / "augmented" / f"dt={day}"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.parquet"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--start", type=dt.date.fromisoformat, default=dt.date(1997, 9, 22))
    args = parser.parse_args()
    days = [args.start + dt.timedelta(days=i) for i in range(args.days)]
    # Under .reki/, not /tmp's 0700 folders: as root, the cluster's PostgreSQL runs as a system user that must reach it.
    root = PROJECT_ROOT / ".reki" / "cluster-tests"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-", dir=root))
    tmp.chmod(0o711)
    results = {}
    try:
        for profile_type in (Embedded, Cluster):
            folder = tmp / profile_type.name
            folder.mkdir(mode=0o711)
            profile = profile_type(folder)
            print(f"==> {profile.name}: {len(days)}-day backfill {days[0]}..{days[-1]}", flush=True)
            results[profile.name] = run_profile(profile, days, tmp)
            print(json.dumps({k: v for k, v in results[profile.name].items() if k != "vectors_sha256"}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    same = {d.isoformat(): results["embedded"]["vectors_sha256"][d.isoformat()] == results["cluster"]["vectors_sha256"][d.isoformat()]
            for d in days}
    out = {
        "what": f"{len(days)}-day backfill of {DAG_ID} ({days[0]}..{days[-1]}), max_active_runs 1, on each profile",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": FAST,
        "embedded": results["embedded"],
        "cluster": results["cluster"],
        "cluster_over_embedded": round(results["cluster"]["wall_s"] / results["embedded"]["wall_s"], 3),
        "published_vectors_identical": same,
    }
    path = PROJECT_ROOT / "bench" / "results" / "cluster.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"cluster_over_embedded {out['cluster_over_embedded']}; vectors identical per day: {same}; -> {path}")


if __name__ == "__main__":
    main()
