"""The cluster profile's smoke run (in `make test`): start it, run the daily DAG for one date through the Celery
workers (extraction on the gpu queue's worker, Spark on the standalone master), publish, stop, and nothing is left
running. On the running profile, its security as an attacker with a shell on the machine would probe it: sign-in
roles through the REST API, Spark refusing a worker without the secret, every process's environment and command
line against the allow-list of secrets, listening sockets, logs and generated files. Also the preflight: a port
already taken stops `make cluster` before anything starts."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from unittest import mock

import psutil
import pytest

from reki_core.airflow_api import AirflowApiError
from reki_core.storage.lake import lake_of
from tests.security_checks import (generated_secrets, listening_beyond_loopback, open_to_others, secrets_held,
                                   secrets_in_files, with_children)
from tests.cluster.conftest import (DAG_ID, ClusterStack, cluster_env, failed_logs, remote_task_logs, start_cluster,
                                    task_instances, trigger_day, wait_run)

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


AIRFLOW_SECRETS = {f"cluster.json.{k}" for k in ("fernet_key", "jwt_secret", "api_secret_key", "postgres_password",
                                                  "redis_password")}
WRITER_SECRET = {"s3_credentials.json.writer.secret_key", "s3_identities.json.identities[0].credentials[0].secretKey"}
# The API server reads the task logs on the object store with the read-only identity.
READER_SECRET = {"s3_credentials.json.reader.secret_key", "s3_identities.json.identities[1].credentials[0].secretKey"}
# The tasks also reach the lake's Iceberg catalog (pyiceberg) with its own PostgreSQL login.
TASK_SECRETS = WRITER_SECRET | {"spark_connect.json.token", "cluster.json.catalog_password"}
SPARK_SECRET = {"cluster.json.spark_auth_secret", "cluster_spark.conf:spark.authenticate.secret"}
# The generated secrets each program may hold in its environment. Any other program (supervisord, PostgreSQL, Redis,
# SeaweedFS, the Spark master, a program added later) may hold none: a new one is checked by this list as it stands.
ALLOWED_SECRETS = {
    **{name: AIRFLOW_SECRETS for name in ("scheduler", "dag-processor", "triggerer")},
    "api-server": AIRFLOW_SECRETS | READER_SECRET,
    **{name: AIRFLOW_SECRETS | TASK_SECRETS for name in ("worker", "gpu-worker")},
    "spark-connect": {"spark_connect.json.token"} | WRITER_SECRET,  # s3a writes the lake's tables as the writer
    # Handed by the worker to its executors, in their environment; the executors also inherit the writer identity
    # from the worker's (they write the lake's table files through s3a).
    "spark-worker": SPARK_SECRET | WRITER_SECRET,
}


def _programs(stack) -> dict[str, list[psutil.Process]]:
    """Each supervisord program's processes (with their children, e.g. Spark's executors, Celery's task processes),
    and supervisord itself."""
    from reki_core import cluster

    cfg = stack.config()
    programs = {name: with_children([pid]) for name in cluster.SERVICE_NAMES if (pid := cluster.program_pid(cfg, name))}
    programs["supervisord"] = [psutil.Process(cluster.supervisord_pid(cfg))]
    return programs


def _check_roles_through_the_rest_api(stack) -> None:
    """FAB: the operator may trigger and backfill, the viewer only reads, a request without a token is refused."""
    viewer, operator = stack.api("viewer"), stack.api("operator")
    assert viewer.call("GET", f"/api/v2/dags/{DAG_ID}")["dag_id"] == DAG_ID
    backfill = {"dag_id": DAG_ID, "from_date": "1997-09-20T00:00:00Z", "to_date": "1997-09-21T00:00:00Z"}
    assert operator.call("POST", "/api/v2/backfills/dry_run", backfill)["total_entries"] == 2
    for method, path, body in (("POST", "/api/v2/backfills/dry_run", backfill), ("POST", "/api/v2/backfills", backfill),
                               ("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": "1997-09-20T00:00:00Z"})):
        with pytest.raises(AirflowApiError) as refused:
            viewer.call(method, path, body)
        assert refused.value.code == 403, (path, str(refused.value))
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(f"http://127.0.0.1:{stack.api_port}/api/v2/dags", timeout=10)
    assert anonymous.value.code in (401, 403)


def _check_spark_refuses_a_worker_without_the_secret(stack) -> None:
    from reki_core import cluster

    cfg = stack.config()
    master_json = f"http://127.0.0.1:{cfg.cluster.spark_master_webui_port}/json/"
    log = stack.tmp / "rogue-worker.log"
    argv = cluster.service_commands(cfg)["spark-worker"]
    argv = argv[:argv.index("--properties-file")] + ["--webui-port", "0", "--work-dir", str(stack.tmp / "rogue-work")]
    env = {**cluster.supervisord_environment(stack.env), **cluster.spark_environment(cfg)}
    with log.open("wb") as out:
        rogue = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "Failed to connect to master" not in log.read_text(errors="replace"):
            time.sleep(2)
        workers = json.load(urllib.request.urlopen(master_json, timeout=10))["workers"]
    finally:
        os.killpg(rogue.pid, 9)
        rogue.wait()
    text = log.read_text(errors="replace")
    assert "Failed to connect to master" in text and "SASL" in text, text[-3000:]  # its handshake lacks the secret
    assert len(workers) == 1, workers  # only the profile's own worker registered


def _check_the_stages_tables_survive_a_catalog_restart(stack) -> None:
    """The stages' tables are in this profile's PostgreSQL catalog and on its SeaweedFS. Then the catalog database is
    restarted while a task commits day after day to a table: each commit the restart hits fails with an error naming
    the catalog database (or lands whole), the retry completes, and no day is lost or doubled."""
    import threading
    import pandas as pd

    from reki_core import cluster
    from reki_core.storage.lake import CatalogUnavailableError

    cfg = cluster.with_cluster_catalog(stack.config())
    task_env = {**cluster.s3_writer_environment(cfg), **cluster.catalog_environment(cfg)}  # what a worker's task gets
    with mock.patch.dict(os.environ, task_env):
        lake = lake_of(cfg)
        assert lake.store is not None and lake.store.catalog_uri.startswith("postgresql")
        for dataset in ("raw/interactions", "features/items", "prompts"):  # written by pyiceberg and by Spark
            assert DAY in lake.partitions(dataset), dataset
            assert lake.load_table(dataset).location().startswith(f"s3a://{cfg.lake.bucket}/"), dataset

        probe = "faults/catalog_restart"
        restarted, hit = threading.Event(), threading.Event()

        def restart() -> None:
            time.sleep(1.0)  # a few commits in
            # Down until a commit has failed on it, then up again: the restart spans a commit however slow the machine
            # (a quick `restart` could fall between two commits, which pool_pre_ping then bridges unseen).
            stack.supervisorctl("stop", "postgres")
            hit.wait(timeout=60)
            stack.supervisorctl("start", "postgres")
            restarted.set()

        def rows(day: dt.date) -> pd.DataFrame:
            return pd.DataFrame({"key": [f"{day}-{i}" for i in range(3)], "value": [day.toordinal()] * 3})

        restarter = threading.Thread(target=restart)
        days, failures, pending = [], [], []
        day = dt.date(2026, 1, 1)
        restarter.start()
        while not restarted.is_set() or len(days) < 5:  # commit after commit, across the restart
            day += dt.timedelta(days=1)
            days.append(day)
            try:
                lake.write_partition(rows(day), probe, day)
            except CatalogUnavailableError as exc:
                failures.append(str(exc))
                pending.append(day)
                hit.set()
                time.sleep(0.25)  # a refused connection fails at once: a few tries a second, as a task's retries
            assert len(days) < 400, "the restart did not end"
        restarter.join()
        assert failures, "the restart hit no commit"
        assert all("catalog database postgresql" in f and "***" in f and "retry" in f for f in failures), failures
        password = cluster.ensure_cluster_secrets(cfg)["catalog_password"]
        assert not any(password in f for f in failures)  # the login never reaches a message
        deadline = time.monotonic() + 60
        while pending:  # the task's retry, once the database is back
            try:
                lake.write_partition(rows(pending[0]), probe, pending[0])
                pending.pop(0)
            except CatalogUnavailableError:
                assert time.monotonic() < deadline, "the catalog database did not come back"
                time.sleep(1)
        table = lake.read_range(probe, upto=days[-1])
        assert lake.partitions(probe) == days
        assert table.groupby("dt").size().to_dict() == {d: 3 for d in days}  # every day once, none doubled
        assert sorted(table["key"]) == sorted(f"{d}-{i}" for d in days for i in range(3))


def _check_secrets_stay_where_they_belong(stack) -> None:
    secrets = generated_secrets(stack.state)
    assert AIRFLOW_SECRETS | TASK_SECRETS | SPARK_SECRET <= set(secrets), sorted(secrets)
    programs = _programs(stack)
    held, on_command_lines = [], []
    for name, procs in programs.items():
        for proc in procs:
            in_env, in_argv = secrets_held(proc, secrets)
            held += [f"{name} pid {proc.pid}: {s}" for s in sorted(in_env - ALLOWED_SECRETS.get(name, set()))]
            on_command_lines += [f"{name} pid {proc.pid}: {s}" for s in sorted(in_argv)]
    assert held == [], held
    assert on_command_lines == [], on_command_lines
    # Every process of the profile is one program's (nothing escapes the allow-list).
    seen = {p.pid for procs in programs.values() for p in procs}
    strays = [p for p in _cluster_processes(stack.state) if p.pid not in seen and p.ppid() not in seen]
    assert strays == [], [(p.pid, p.info["cmdline"][:3]) for p in strays]
    assert listening_beyond_loopback([p for procs in programs.values() for p in procs]) == []
    # Logs, Airflow's home, PostgreSQL's and Redis's data, the lake: no generated secret, owner-only. Redis's and
    # supervisord's configs hold their own password (Redis has no other way; supervisord's socket), owner-only.
    configs = [stack.state / "cluster" / "redis.conf", stack.state / "cluster" / "supervisord.conf"]
    roots = [stack.state / "logs", stack.state / "cluster", stack.lake]
    assert secrets_in_files(roots, secrets, skip=configs) == []
    assert open_to_others([*roots, stack.state / "secrets"]) == []
    # The task logs are on the object store (the local files stay empty): none holds a generated secret.
    task_logs = remote_task_logs(stack)
    assert any("task_id=spark_features" in key for key in task_logs), sorted(task_logs)[:5]
    assert [f"{key}: {name}" for key, body in task_logs.items() for name, value in secrets.items()
            if value.encode() in body] == []
    assert {oct(c.stat().st_mode & 0o777) for c in configs} == {"0o600"}


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
    # The lake as `make run` and a deployment have it: documents and stores on the store too, not in a folder.
    stack = start_cluster(cluster_dir_factory("smoke"), REKI__PATHS__LAKE_URI="s3://reki-lake/lake")
    try:
        status = stack.supervisorctl("status")
        for name in ("postgres", "redis", "seaweedfs", "spark-master", "spark-worker", "spark-connect", "api-server",
                     "scheduler", "dag-processor", "triggerer", "worker", "gpu-worker"):
            assert f"{name} " in status and "RUNNING" in status.split(f"{name} ", 1)[1].splitlines()[0], status
        api = stack.api()
        health = api.call("GET", "/api/v2/monitor/health")
        assert health["metadatabase"]["status"] == "healthy", health
        assert api.unpause(DAG_ID)
        _check_roles_through_the_rest_api(stack)
        run_id = trigger_day(stack.api("operator"), DAY)  # the operator's run
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

        from reki_core import cluster

        with mock.patch.dict(os.environ, cluster.s3_writer_environment(cfg)):  # what a worker's task gets
            lake = lake_of(cluster.with_cluster_catalog(cfg))
            assert lake.uri.startswith("s3://") and lake.read_json(f"_runs/dt={DAY}/publish.json")["success"] is True
        assert not stack.lake.exists(), "the lake's documents are objects: no lake folder on the local disk"
        assert not list((stack.state / "cluster" / "airflow").glob("*.db")), "no SQLite on the cluster profile"
        _check_secrets_stay_where_they_belong(stack)
        _check_spark_refuses_a_worker_without_the_secret(stack)
        _check_the_stages_tables_survive_a_catalog_restart(stack)
    finally:
        stopped = stack.down()
    assert stopped.returncode == 0, stopped.stderr
    assert "cluster profile stopped" in stopped.stdout
    assert _cluster_processes(stack.state) == [], [p.info["cmdline"][:3] for p in _cluster_processes(stack.state)]
