"""The cluster profile's full suite (`make test-cluster`): one profile started for the module runs the daily DAG
(its vectors compared with the embedded profile's for the same date), a 7-day CLI backfill (`airflow backfill
create` directly: no SQLite retry), a REST backfill, then the faults: Redis stopped while a run is queued, the gpu
worker killed mid-shard, PostgreSQL restarted during a run, the Spark master down when a feature task starts; and
last the preflight's wrong DB and broker passwords."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import time
from unittest import mock

import pandas as pd
import pytest

from reki_core.airflow_api import states_of
from reki_core.config import PROJECT_ROOT
from reki_core.storage.lake import Lake, lake_of
from tests.cluster.conftest import (DAG_ID, ClusterStack, failed_logs, task_instances, task_log, trigger_day,
                                    vector_records, wait_for, wait_run)
from tests.conftest import free_port_block

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(3600)]

D0 = dt.date(1997, 9, 22)
DAYS = [D0 + dt.timedelta(days=i) for i in range(7)]


def run_and_wait(stack: ClusterStack, api, day: dt.date) -> str:
    run_id = trigger_day(api, day)
    assert wait_run(api, run_id) == "success", failed_logs(stack, api, run_id)
    return run_id


def program_pid(stack: ClusterStack, name: str) -> int:
    return int(stack.supervisorctl("pid", name).strip())


def versions_of(stack: ClusterStack, day: dt.date) -> list[str]:
    from reki_core.storage.publish import list_versions
    from reki_core.storage.s3_access import ObjectStore, resolve_s3_access

    cfg = stack.config()
    creds = json.loads((stack.state / "secrets" / "s3_credentials.json").read_text())["writer"]
    store = ObjectStore(resolve_s3_access(cfg, access_key=creds["access_key"], secret_key=creds["secret_key"]))
    return sorted(v for v in list_versions(store, cfg.scenario.name) if v.startswith(f"{day}_"))


def latest(stack: ClusterStack) -> dict:
    from reki_core.storage.publish import read_latest, read_manifest
    from reki_core.storage.s3_access import ObjectStore, resolve_s3_access

    cfg = stack.config()
    creds = json.loads((stack.state / "secrets" / "s3_credentials.json").read_text())["reader"]
    store = ObjectStore(resolve_s3_access(cfg, access_key=creds["access_key"], secret_key=creds["secret_key"]))
    pointer, _ = read_latest(store, cfg.scenario.name)
    assert pointer is not None and read_manifest(store, cfg.scenario.name, pointer["version"]) is not None, pointer
    return pointer


def test_daily_run_publishes_the_same_vectors_as_the_embedded_profile(cluster, tmp_path):
    stack, api = cluster
    run_and_wait(stack, api, D0)
    # The same date on the embedded profile (SQLite, `airflow dags test`, Spark Connect on local[2]), own stack.
    base = free_port_block(16)
    env = {k: v for k, v in stack.env.items() if not k.startswith(("REKI__PATHS__", "REKI__OBJECT_STORE__",
                                                                     "REKI__SPARK__", "REKI__CLUSTER__"))}
    env.update({"REKI__PATHS__STATE_DIR": str(tmp_path / "state"), "REKI__PATHS__LAKE_URI": str(tmp_path / "lake"),
                "REKI__PATHS__DATA_DIR": stack.env["REKI__PATHS__DATA_DIR"],
                "REKI__PATHS__MODELS_DIR": stack.env["REKI__PATHS__MODELS_DIR"],
                "REKI__OBJECT_STORE__ENDPOINT_URL": f"http://127.0.0.1:{base}",
                "REKI__OBJECT_STORE__BUCKET": "reki-embedded", "REKI__SPARK__CONNECT_URL": f"sc://localhost:{base + 12}",
                "AIRFLOW_HOME": str(tmp_path / "airflow")})
    # The embedded lake's vectors, read before its stack stops (its tables' files are on its own SeaweedFS).
    embedded_file = tmp_path / "embedded_vectors.parquet"
    dump = ("python -c 'import sys; from reki_core.config import load_config; from reki_core.storage.lake import lake_of; "
            "lake_of(load_config()).read_partition(\"vectors/augmented\", sys.argv[1]).to_parquet(sys.argv[2])' "
            f"{D0} {embedded_file}")
    command = ("source infra/env.sh && reki stack up && bash infra/airflow.sh init && "
               f"airflow dags test {DAG_ID} {D0} && {dump}; rc=$?; reki stack down; exit $rc")
    proc = subprocess.run(["bash", "-c", command], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0 and "state=success" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-5000:]
    from reki_core import cluster as profile

    cfg = profile.with_cluster_catalog(stack.config())
    with mock.patch.dict(os.environ, {**profile.s3_writer_environment(cfg), **profile.catalog_environment(cfg)}):
        cluster_vectors = vector_records(lake_of(cfg).read_partition("vectors/augmented", D0))
    assert cluster_vectors, f"no augmented vectors for {D0}"
    assert cluster_vectors == vector_records(pd.read_parquet(embedded_file)), \
        "the two profiles published different vectors for the same date"


def test_rest_api_backfill_reprocesses_a_completed_date(cluster):
    """The calls the UI makes: a backfill that re-runs a completed date asks the LLM nothing new, publishes a new
    version of that date, and `latest` does not move back."""
    stack, api = cluster
    lake = Lake(str(stack.lake))
    version_before = lake.read_json(f"_runs/dt={D0}/publish.json")["version"]
    latest_before = latest(stack)
    backfill = api.call("POST", "/api/v2/backfills", {
        "dag_id": DAG_ID, "from_date": f"{D0}T00:00:00Z", "to_date": f"{D0}T00:00:00Z", "max_active_runs": 1,
        "reprocess_behavior": "completed", "run_backwards": False})
    wait_for(lambda: api.call("GET", f"/api/v2/backfills/{backfill['id']}").get("completed_at"), 1500,
             "the REST backfill", interval=10)
    assert lake.read_json(f"_runs/dt={D0}/llm_plan.json")["n_pending"] == 0
    assert lake.read_json(f"_runs/dt={D0}/publish.json")["version"] != version_before
    assert latest(stack)["dt"] == latest_before["dt"]


def test_cli_backfill_over_seven_days(cluster):
    """`airflow backfill create` directly (PostgreSQL: no retry around it); D0 already ran, the other six days run
    in order."""
    stack, api = cluster
    api.wait_backfills_completed(DAG_ID)
    created = stack.sh(f"airflow backfill create --dag-id {DAG_ID} --from-date {DAYS[0]} --to-date {DAYS[-1]} "
                       "--max-active-runs 1 --reprocess-behavior none")
    assert created.returncode == 0, created.stdout + created.stderr
    runs = api.wait_for_days(DAG_ID, DAYS, timeout_s=3000)
    states = states_of(runs)
    if not all(s == "success" for s in states.values()):  # pytest.fail: an assert's long message would be cut
        every_run = [(r["run_id"], r["run_type"], r["state"], r.get("data_interval_start"))
                     for r in api.runs(DAG_ID)]
        pytest.fail(f"days: {states}\nruns: {every_run}\nscheduler log:\n" + stack.sh(
            f"tail -60 {stack.state}/logs/cluster-scheduler.log", cluster_env=False).stdout)
    assert {runs[d]["run_type"] for d in DAYS[1:]} == {"backfill"}
    lake = Lake(str(stack.lake))
    for day in DAYS:
        assert lake.read_json(f"_runs/dt={day}/publish.json")["success"] is True, day
    assert latest(stack)["dt"] == DAYS[-1].isoformat()


def test_redis_stopped_while_a_run_is_queued_then_the_run_completes(cluster):
    stack, api = cluster
    day = DAYS[-1] + dt.timedelta(days=1)
    assert "stopped" in stack.supervisorctl("stop", "redis")
    run_id = trigger_day(api, day)
    # The scheduler queues the run's first task; the executor cannot reach the broker.
    wait_for(lambda: any(ti["state"] in ("queued", "scheduled") for ti in task_instances(api, run_id)), 120,
             "a task of the run to be queued")
    time.sleep(30)
    assert "started" in stack.supervisorctl("start", "redis")
    assert wait_run(api, run_id) == "success", failed_logs(stack, api, run_id)


def test_gpu_worker_killed_mid_shard_is_retried_and_resumes_from_its_answers(cluster):
    stack, api = cluster
    day = DAYS[-1] + dt.timedelta(days=2)
    run_id = trigger_day(api, day)
    checkpoints = stack.lake / "knowledge" / "_inflight" / f"dt={day}" / "shard-00000"
    wait_for(lambda: checkpoints.is_dir() and any(not p.name.startswith(".") for p in checkpoints.glob("*.parquet")),
             900, "the extraction shard's first checkpoint", interval=0.05)
    worker = program_pid(stack, "gpu-worker")
    os.killpg(worker, signal.SIGKILL)  # the worker, its pool and the task it runs: no clean shutdown
    assert wait_run(api, run_id) == "success", failed_logs(stack, api, run_id)
    extract = [ti for ti in task_instances(api, run_id) if ti["task_id"] == "extract"]
    assert [ti["try_number"] for ti in extract] == [2], extract
    shard = Lake(str(stack.lake)).read_json(f"_runs/dt={day}/llm_shard_00000.json")
    assert shard["resumed_from_earlier_attempt"] > 0 and shard["calls"] == shard["answered"], shard
    assert len(versions_of(stack, day)) == 1, "published twice"
    assert program_pid(stack, "gpu-worker") != worker


def test_postgres_restarted_during_a_run_then_the_scheduler_recovers(cluster):
    stack, api = cluster
    before = latest(stack)
    day = DAYS[-1] + dt.timedelta(days=3)
    run_id = trigger_day(api, day)
    wait_for(lambda: any(ti["state"] == "running" for ti in task_instances(api, run_id)), 300, "a running task")
    restarted = stack.supervisorctl("restart", "postgres")
    assert "started" in restarted, restarted
    state = wait_run(api, run_id)
    if state != "success":  # a run the restart broke must say why, and `latest` must be intact
        assert state == "failed", state
        failed = [ti for ti in task_instances(api, run_id) if ti["state"] == "failed"]
        assert failed, failed_logs(stack, api, run_id)
        assert latest(stack)["version"] == before["version"]
    else:
        assert latest(stack)["dt"] == day.isoformat()
    health = wait_for(lambda: api.call("GET", "/api/v2/monitor/health")["scheduler"]["status"] == "healthy", 120,
                      "the scheduler to heartbeat again")
    assert health


def test_spark_master_down_when_a_feature_task_starts_then_the_retry_succeeds(cluster):
    stack, api = cluster
    cfg = stack.config()
    day = DAYS[-1] + dt.timedelta(days=4)
    stack.supervisorctl("stop", "spark-master")
    stack.supervisorctl("restart", "spark-connect")  # a Connect server (re)starting finds no master
    run_id = trigger_day(api, day)
    first = wait_for(lambda: [ti for ti in task_instances(api, run_id)
                              if ti["task_id"] == "spark_features" and ti["state"] in ("up_for_retry", "failed")],
                     900, "spark_features to fail its first try", interval=3)
    text = task_log(api, run_id, "spark_features", 1)  # from the object store, as the UI shows it
    from reki_core.spark import redact

    assert redact(cfg.spark.connect_url) in text or "spark://127.0.0.1" in text, text[-3000:]
    # The Connect server's log names the master it cannot reach.
    connect_log = (stack.state / "logs" / "cluster-spark-connect.log").read_text(errors="replace")
    assert f"127.0.0.1:{cfg.cluster.spark_master_port}" in connect_log, connect_log[-3000:]
    assert first[0]["state"] == "up_for_retry", first
    assert "started" in stack.supervisorctl("start", "spark-master")
    stack.supervisorctl("start", "spark-connect")
    assert wait_run(api, run_id) == "success", failed_logs(stack, api, run_id)


def _edit_secret(stack: ClusterStack, key: str, value: str) -> str:
    path = stack.state / "secrets" / "cluster.json"
    secrets = json.loads(path.read_text())
    old, secrets[key] = secrets[key], value
    path.write_text(json.dumps(secrets))
    return old


@pytest.mark.parametrize("key, service, expected", [
    ("postgres_password", "PostgreSQL", "rejected the password in"),
    ("redis_password", "Redis (the Celery broker)", "rejected the redis_password in"),
])
def test_a_wrong_password_stops_make_cluster_naming_the_file_and_the_fix(cluster, key, service, expected):
    stack, _ = cluster
    stack.down()
    old = _edit_secret(stack, key, "not-the-password")
    try:
        proc = stack.up()
    finally:
        _edit_secret(stack, key, old)
    assert proc.returncode == 1
    assert service in proc.stderr and expected in proc.stderr and "cluster.json" in proc.stderr, proc.stderr
    assert not (stack.state / "cluster" / "supervisord.pid").exists() or "not running" in stack.sh(
        "python -m reki_core.cluster status", cluster_env=False).stdout, "a failed start must stop what it started"
