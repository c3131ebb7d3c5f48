"""What `make cluster` generates, checked without starting it: supervisord's programs, the services' environment,
the credentials file."""

from __future__ import annotations

import configparser
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
    assert "%%h" in conf["program:worker"]["command"]  # Celery's %h, escaped from supervisord's expansion
    assert conf["unix_http_server"]["file"].startswith(str(cfg.state_dir / "cluster"))


def test_no_secret_on_any_command_line(tmp_path):
    cfg = make_config(tmp_path)
    secrets = cluster.ensure_cluster_secrets(cfg)
    command_lines = " ".join(" ".join(argv) for argv in cluster.service_commands(cfg).values())
    for key in ("postgres_password", "redis_password", "fernet_key", "jwt_secret", "api_secret_key"):
        assert secrets[key] not in command_lines, key
    mode = stat.S_IMODE(cluster.secrets_file(cfg).stat().st_mode)
    assert mode == 0o600


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
