"""What `make cluster` generates, checked without starting it: supervisord's programs, the services' environment,
the credentials file."""

from __future__ import annotations

import configparser
import json
import stat

from reki_core import cluster
from tests.conftest import make_config


def test_supervisord_runs_every_service_restarted_and_stopped_with_its_group(tmp_path):
    cfg = make_config(tmp_path)
    conf = configparser.RawConfigParser()
    conf.read_string(cluster.supervisord_conf(cfg))
    programs = [s.removeprefix("program:") for s in conf.sections() if s.startswith("program:")]
    assert programs == list(cluster.SERVICE_NAMES)
    priorities = [conf.getint(f"program:{p}", "priority") for p in programs]
    assert priorities == sorted(priorities) and priorities[0] < priorities[programs.index("api-server")]
    for name in programs:
        section = conf[f"program:{name}"]
        assert section["autorestart"] == "true" and section["stopasgroup"] == "true" and section["killasgroup"] == "true"
        assert section["stdout_logfile"] == str(cfg.state_dir / "logs" / f"cluster-{name}.log")
        # Airflow's programs wait for the migrated database; the infrastructure starts with supervisord.
        assert section["autostart"] == ("false" if name in cluster.AIRFLOW_SERVICES else "true")
    assert conf["program:postgres"]["stopsignal"] == "INT"  # fast shutdown, not "smart" (waits for every client)
    # The programs with secrets start through `exec` (their secrets added to their own environment only).
    for name in cluster.WITH_SECRETS:
        assert conf[f"program:{name}"]["command"].endswith(f"-m reki_core.cluster exec {name}"), name
    assert "%h" in cluster.service_commands(cfg)["worker"][-2]  # Celery's %h, reaching Celery unexpanded
    assert conf["supervisord"]["umask"] == "077"
    assert conf["unix_http_server"]["file"].startswith(str(cfg.state_dir / "cluster"))


def test_no_secret_on_any_command_line(tmp_path):
    cfg = make_config(tmp_path)
    secrets = cluster.ensure_cluster_secrets(cfg)
    command_lines = " ".join(" ".join(argv) for argv in cluster.service_commands(cfg).values())
    for key in ("postgres_password", "redis_password", "fernet_key", "jwt_secret", "api_secret_key", "spark_auth_secret"):
        assert secrets[key] not in command_lines, key
    mode = stat.S_IMODE(cluster.secrets_file(cfg).stat().st_mode)
    assert mode == 0o600


def test_each_program_gets_only_its_own_secrets_and_supervisord_none(tmp_path):
    cfg = make_config(tmp_path)
    s = cluster.ensure_cluster_secrets(cfg)
    writer_secret = cluster.ensure_credentials(cfg.state_dir)["writer"].secret_key
    token = cluster.ensure_connect_token(cfg.state_dir)
    caller = {"PATH": "/usr/bin", "HOME": "/root", "REKI__PATHS__STATE_DIR": str(cfg.state_dir),
              "AWS_SECRET_ACCESS_KEY": writer_secret, "SPARK_CONNECT_AUTHENTICATE_TOKEN": token,
              "AIRFLOW_CONN_AWS_DEFAULT": "{}", "AIRFLOW__CORE__FERNET_KEY": s["fernet_key"], "REKI_LLM_API_KEY": "k" * 20,
              "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://u:pw@h/db", "AIRFLOW__CORE__PARALLELISM": "4"}
    base = cluster.supervisord_environment(caller)
    assert base == {"PATH": "/usr/bin", "HOME": "/root", "REKI__PATHS__STATE_DIR": str(cfg.state_dir),
                    "AIRFLOW__CORE__PARALLELISM": "4"}
    airflow_secrets = [s[k] for k in ("fernet_key", "jwt_secret", "api_secret_key", "postgres_password", "redis_password")]

    def holds(env, value):
        return any(value in v for v in env.values())

    for name in cluster.AIRFLOW_SERVICES:
        env = cluster.program_environment(cfg, name, base)
        assert all(holds(env, v) for v in airflow_secrets), name
        assert holds(env, writer_secret) == holds(env, token) == (name in cluster.TASK_RUNNERS), name
        assert not holds(env, s["spark_auth_secret"]) and not holds(env, s["supervisor_password"]), name
        assert env["AIRFLOW__CORE__AUTH_MANAGER"] == cluster.FAB_AUTH_MANAGER
    connect = cluster.program_environment(cfg, "spark-connect", base)
    assert connect["SPARK_CONNECT_AUTHENTICATE_TOKEN"] == token
    # The Connect server writes the lake's tables through s3a: the writer identity, in its environment.
    assert connect["AWS_SECRET_ACCESS_KEY"] == writer_secret
    assert not any(holds(connect, v) for v in [*airflow_secrets, s["spark_auth_secret"], s["catalog_password"]])
    # The standalone worker's executors write the tables' data files through s3a: they inherit the worker's
    # environment, so the worker holds the writer identity, and nothing else secret.
    worker = cluster.program_environment(cfg, "spark-worker", base)
    assert (worker["AWS_ACCESS_KEY_ID"], worker["AWS_SECRET_ACCESS_KEY"]) == \
        (connect["AWS_ACCESS_KEY_ID"], connect["AWS_SECRET_ACCESS_KEY"])
    assert not any(holds(worker, v) for v in [*airflow_secrets, token, s["spark_auth_secret"], s["catalog_password"],
                                              s["supervisor_password"]])
    assert worker["SPARK_HOME"] == cluster.spark_environment(cfg)["SPARK_HOME"]
    import pytest

    with pytest.raises(cluster.ClusterError, match="holds no secrets"):
        cluster.program_environment(cfg, "redis", base)
    # supervisord's config: no program environment with a secret; its own socket password is its only one (0600).
    body = cluster.supervisord_conf(cfg)
    assert not any(v in body for v in [*airflow_secrets, writer_secret, token, s["spark_auth_secret"]])


def test_spark_authenticates_with_a_secret_kept_in_a_private_file(tmp_path):
    cfg = make_config(tmp_path)
    path = cluster.spark_properties_file(cfg)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    props = dict(line.split("=", 1) for line in path.read_text().splitlines())
    s = cluster.ensure_cluster_secrets(cfg)
    assert props == {"spark.authenticate": "true", "spark.authenticate.secret": s["spark_auth_secret"],
                     # The lake catalog's own PostgreSQL login (not Airflow's), off the command line.
                     "spark.sql.catalog.lake.jdbc.user": cluster.CATALOG_DB_USER,
                     "spark.sql.catalog.lake.jdbc.password": s["catalog_password"]}
    commands = cluster.service_commands(cfg)
    connect = commands["spark-connect"]
    assert f"spark.sql.catalog.lake.uri={cluster.catalog_uri(cfg)}" in connect
    assert not any(s["catalog_password"] in arg or s["postgres_password"] in arg for arg in connect)
    for name in ("spark-master", "spark-worker", "spark-connect"):
        argv = commands[name]
        assert argv[argv.index("--properties-file") + 1] == str(path), name
    users = cluster.ui_users_file(cfg)
    assert stat.S_IMODE(users.stat().st_mode) == 0o600 and set(json.loads(users.read_text())) == set(cluster.UI_USERS)


def test_environment_is_postgres_and_celery_with_the_configured_queues(tmp_path):
    cfg = make_config(tmp_path, REKI__CLUSTER__DEFAULT_QUEUE="cpu", REKI__CLUSTER__GPU_QUEUE="cuda",
                      REKI__CLUSTER__POSTGRES_PORT="15433")
    base = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": "reki_airflow.db.SQLITE_CONNECT_ARGS",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "sqlite:////tmp/airflow.db", "PATH": "/usr/bin"}
    env = cluster.airflow_environment(cfg, base)
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@127.0.0.1:15433/airflow")
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql+psycopg2://")
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://:") and "@127.0.0.1:6380/0" in env["AIRFLOW__CELERY__BROKER_URL"]
    assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS" not in env, "the SQLite workaround must not reach PostgreSQL"
    assert not any("sqlite" in v.lower() for v in env.values())
    assert env["AIRFLOW__OPERATORS__DEFAULT_QUEUE"] == "cpu"
    assert env["REKI__SPARK__MASTER"] == "spark://127.0.0.1:7077"
    commands = cluster.service_commands(cfg)
    assert commands["worker"][commands["worker"].index("--queues") + 1] == "cpu"
    gpu = commands["gpu-worker"]
    assert gpu[gpu.index("--queues") + 1] == "cuda" and gpu[gpu.index("--concurrency") + 1] == "1"
    assert commands["spark-connect"][commands["spark-connect"].index("--master") + 1] == "spark://127.0.0.1:7077"


def test_a_service_is_waited_for_until_it_answers_but_a_wrong_password_stops_at_once(tmp_path):
    import pytest

    answers = iter([ConnectionError("refused"), ConnectionError("refused"), "up"])

    def connect():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    log = tmp_path / "svc.log"
    assert cluster._until_it_answers(connect, ConnectionError, "svc", log, timeout_s=5, interval_s=0) == "up"

    def refused():
        raise ConnectionError("refused")

    with pytest.raises(cluster.ClusterError, match=rf"svc did not answer in 0 s: refused; see {log}"):
        cluster._until_it_answers(refused, ConnectionError, "svc", log, timeout_s=0, interval_s=0)

    calls = []

    def wrong_password():
        calls.append(1)
        raise cluster.ClusterError("svc rejected the password")

    with pytest.raises(cluster.ClusterError, match="rejected"):
        cluster._until_it_answers(wrong_password, ConnectionError, "svc", log, timeout_s=5, interval_s=0)
    assert len(calls) == 1


def test_exec_starts_the_program_with_its_own_secrets(tmp_path, monkeypatch):
    cfg = make_config(tmp_path)
    calls = []
    monkeypatch.setattr(cluster.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    monkeypatch.setattr(cluster.os, "environ", {"PATH": "/usr/bin", "REKI__PATHS__STATE_DIR": str(cfg.state_dir)})
    for name in ("worker", "scheduler", "spark-connect", "spark-worker"):
        cluster.exec_program(cfg, name)
    token = cluster.ensure_connect_token(cfg.state_dir)
    (worker, scheduler, connect, spark_worker) = calls
    assert worker[1] == cluster.service_commands(cfg)["worker"] and worker[0] == worker[1][0]
    assert worker[2]["SPARK_CONNECT_AUTHENTICATE_TOKEN"] == token and "AWS_SECRET_ACCESS_KEY" in worker[2]
    assert "SPARK_CONNECT_AUTHENTICATE_TOKEN" not in scheduler[2] and "AWS_SECRET_ACCESS_KEY" not in scheduler[2]
    assert scheduler[2]["AIRFLOW__CORE__FERNET_KEY"] == cluster.ensure_cluster_secrets(cfg)["fernet_key"]
    assert connect[2]["SPARK_CONNECT_AUTHENTICATE_TOKEN"] == token and "AIRFLOW__CORE__FERNET_KEY" not in connect[2]
    assert "--properties-file" in connect[1]
    # The Spark worker: its own command (spark.authenticate from the 0600 file) with the writer identity in its
    # environment alone, which the executors it launches inherit; none of it on its command line.
    writer = cluster.ensure_credentials(cfg.state_dir)["writer"]
    assert spark_worker[1] == cluster.service_commands(cfg)["spark-worker"] and spark_worker[0] == spark_worker[1][0]
    assert spark_worker[2]["AWS_ACCESS_KEY_ID"] == writer.access_key
    assert spark_worker[2]["AWS_SECRET_ACCESS_KEY"] == writer.secret_key
    assert "SPARK_CONNECT_AUTHENTICATE_TOKEN" not in spark_worker[2] and "AIRFLOW__CORE__FERNET_KEY" not in spark_worker[2]
    assert not any(writer.secret_key in arg for arg in spark_worker[1])
    assert not any(k.startswith("spark.executorEnv") for arg in spark_worker[1] for k in [arg.split("=", 1)[0]])


def test_a_host_address_is_where_other_hosts_workers_reach_the_stack(tmp_path):
    """PostgreSQL and Redis listen on it and on loopback, the API server on it; every URL a worker gets names it;
    PostgreSQL accepts password logins from its subnets; Spark stays on loopback."""
    cfg = make_config(tmp_path, REKI__CLUSTER__HOST_ADDRESS="10.213.0.1", REKI__CLUSTER__POSTGRES_PORT="15433")
    commands = cluster.service_commands(cfg)
    postgres = " ".join(commands["postgres"])
    assert "listen_addresses=127.0.0.1,10.213.0.1" in postgres
    redis = commands["redis"]
    assert redis[redis.index("--bind") + 1:] == ["127.0.0.1", "10.213.0.1"]
    api = commands["api-server"]
    assert api[api.index("--host") + 1] == "10.213.0.1"
    assert commands["spark-master"][commands["spark-master"].index("--host") + 1] == "127.0.0.1"
    env = cluster.airflow_environment(cfg, {"PATH": "/usr/bin"})
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@10.213.0.1:15433/airflow")
    assert "@10.213.0.1:6380/0" in env["AIRFLOW__CELERY__BROKER_URL"]
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://10.213.0.1:8081/execution/"
    assert cluster.catalog_environment(cfg)["REKI__LAKE__CATALOG_URI"].startswith("jdbc:postgresql://10.213.0.1:15433/")
    (cfg.state_dir / "cluster" / "postgres").mkdir(parents=True)
    cluster.write_pg_hba(cfg)
    hba = (cfg.state_dir / "cluster" / "postgres" / "pg_hba.conf").read_text().splitlines()
    assert "host all all samenet scram-sha-256" in hba and not any(" trust" in line for line in hba)
    assert all(line.endswith("scram-sha-256") for line in hba if not line.startswith("#"))


def test_loopback_profiles_accept_no_other_host(tmp_path):
    import pytest

    cfg = make_config(tmp_path)
    (cfg.state_dir / "cluster" / "postgres").mkdir(parents=True)
    cluster.write_pg_hba(cfg)
    assert "samenet" not in (cfg.state_dir / "cluster" / "postgres" / "pg_hba.conf").read_text()
    assert "listen_addresses=127.0.0.1 " in " ".join(cluster.service_commands(cfg)["postgres"]) + " "
    with pytest.raises(cluster.ClusterError, match="REKI__CLUSTER__HOST_ADDRESS"):
        cluster.worker_environment(cfg, tmp_path / "other", {"PATH": "/usr/bin"})
    for wrong, said in (("0.0.0.0", "every interface"), ("db.example.com", "not an IP address")):
        with pytest.raises(Exception, match=said):
            make_config(tmp_path, REKI__CLUSTER__HOST_ADDRESS=wrong)


def test_task_logs_go_to_the_object_store_written_by_workers_read_by_the_api_server(tmp_path):
    cfg = make_config(tmp_path, REKI__CLUSTER__HOST_ADDRESS="10.213.0.1")
    from reki_core.localstack import ensure_credentials

    creds = ensure_credentials(cfg.state_dir)
    conn_name = f"AIRFLOW_CONN_{cluster.TASK_LOGS_CONN.upper()}"
    worker = cluster.program_environment(cfg, "gpu-worker", {"PATH": "/usr/bin"})
    api = cluster.program_environment(cfg, "api-server", {"PATH": "/usr/bin"})
    scheduler = cluster.program_environment(cfg, "scheduler", {"PATH": "/usr/bin"})
    assert worker["AIRFLOW__LOGGING__REMOTE_LOGGING"] == "True"
    assert worker["AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER"] == f"s3://{cfg.lake.bucket}/airflow-logs"
    assert json.loads(worker[conn_name])["password"] == creds["writer"].secret_key
    assert json.loads(api[conn_name])["password"] == creds["reader"].secret_key
    assert json.loads(api[conn_name])["extra"]["config_kwargs"] == {"s3": {"addressing_style": "path"}}
    assert conn_name not in scheduler
    # Another host's worker: the same settings and secrets, its own Airflow home and state.
    other = cluster.worker_environment(cfg, tmp_path / "host2", {"PATH": "/usr/bin"})
    assert other["AIRFLOW_HOME"] == str(tmp_path / "host2" / "cluster" / "airflow")
    assert other["REKI__PATHS__STATE_DIR"] == str(tmp_path / "host2")
    assert other["AIRFLOW__CELERY__BROKER_URL"] == worker["AIRFLOW__CELERY__BROKER_URL"]
    assert other[conn_name] == worker[conn_name]
