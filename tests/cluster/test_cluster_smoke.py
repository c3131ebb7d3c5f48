"""The cluster profile's smoke run (in `make test`): start it, run the daily DAG for one date through the Celery
workers (extraction on the gpu queue's worker, Spark on the standalone master), publish, stop, and nothing is left
running. Also the preflight: a port already taken stops `make cluster` before anything starts."""

from __future__ import annotations

import datetime as dt
import json
import socket
import urllib.request

import psutil
import pytest

from reki_core.storage.lake import Lake
from tests.cluster.conftest import (DAG_ID, ClusterStack, cluster_env, failed_logs, start_cluster, task_instances,
                                    trigger_day, wait_run)

pytestmark = [pytest.mark.integration, pytest.mark.cluster_smoke, pytest.mark.timeout(2400)]

DAY = dt.date(1997, 9, 22)


def _cluster_processes(state) -> list[psutil.Process]:
    """Every live process of this profile: started by its supervisord (which passes on REKI__PATHS__STATE_DIR)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.environ().get("REKI__PATHS__STATE_DIR") == str(state) and proc.status() != psutil.STATUS_ZOMBIE \
                    and proc.pid != psutil.Process().pid:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_a_taken_port_stops_make_cluster_naming_it_and_the_setting(tmp_path):
    stack = ClusterStack(tmp_path, cluster_env(tmp_path))
    port = int(stack.env["REKI__CLUSTER__REDIS_PORT"])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        proc = stack.up()
    assert proc.returncode == 1
    assert f"port {port} (redis) is taken by pid {psutil.Process().pid} (" in proc.stderr, proc.stderr
    assert "cluster.redis_port (REKI__CLUSTER__REDIS_PORT)" in proc.stderr
    assert not (tmp_path / "state" / "cluster" / "supervisord.pid").exists(), "nothing may start"


def test_daily_dag_through_celery_on_spark_standalone_then_stop(cluster_dir_factory, ml100k_dir):
    stack = start_cluster(cluster_dir_factory("smoke"))
    try:
        status = stack.supervisorctl("status")
        for name in ("postgres", "redis", "seaweedfs", "spark-master", "spark-worker", "spark-connect", "api-server",
                     "scheduler", "dag-processor", "triggerer", "worker", "gpu-worker"):
            assert f"{name} " in status and "RUNNING" in status.split(f"{name} ", 1)[1].splitlines()[0], status
        api = stack.api()
        health = api.call("GET", "/api/v2/monitor/health")
        assert health["metadatabase"]["status"] == "healthy", health
        assert api.unpause(DAG_ID)
        run_id = trigger_day(api, DAY)
        state = wait_run(api, run_id)
        assert state == "success", failed_logs(stack, api, run_id)

        cfg = stack.config()
        tis = task_instances(api, run_id)
        ran = [ti for ti in tis if ti["state"] == "success"]
        assert ran and all(ti["executor"] in (None, "CeleryExecutor") for ti in ran), [(t["task_id"], t["executor"]) for t in ran]
        queues = {ti["task_id"]: ti["queue"] for ti in ran}
        assert queues["extract"] == cfg.cluster.gpu_queue and queues["land"] == cfg.cluster.default_queue, queues
        # Extraction shards ran on the gpu queue's worker, everything else on the default queue's.
        gpu_log = (stack.state / "logs" / "cluster-gpu-worker.log").read_text()
        default_log = (stack.state / "logs" / "cluster-worker.log").read_text()
        assert "task_id='extract'" in gpu_log and "task_id='extract'" not in default_log, gpu_log[-3000:]
        assert "task_id='land'" in default_log and "task_id='land'" not in gpu_log, default_log[-3000:]

        # The Connect server is an application of the standalone master (not local[*]).
        master = json.load(urllib.request.urlopen(
            f"http://127.0.0.1:{cfg.cluster.spark_master_webui_port}/json/", timeout=10))
        assert master["status"] == "ALIVE" and len(master["workers"]) == 1, master
        assert any(app["cores"] > 0 for app in master["activeapps"]), master["activeapps"]

        lake = Lake(str(stack.lake))
        assert lake.read_json(f"_runs/dt={DAY}/publish.json")["success"] is True
        assert not list((stack.state / "cluster" / "airflow").glob("*.db")), "no SQLite on the cluster profile"
    finally:
        stopped = stack.down()
    assert stopped.returncode == 0, stopped.stderr
    assert "cluster profile stopped" in stopped.stdout
    assert _cluster_processes(stack.state) == [], [p.info["cmdline"][:3] for p in _cluster_processes(stack.state)]
