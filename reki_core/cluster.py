"""The cluster profile on loopback (`make cluster`): Airflow on PostgreSQL with Celery workers (Redis broker) and a
gpu queue, Spark standalone (master, worker, the Spark Connect server on that master), SeaweedFS; every service a
program of one supervisord.

State lives in `<state_dir>/cluster/` (PostgreSQL's data folder, Redis's, the Airflow home, supervisord's config,
socket and PID), logs in `<state_dir>/logs/cluster-<service>.log`, generated credentials in
`<state_dir>/secrets/cluster.json` (0600). Each program holds only its own secrets: supervisord and the programs
without secrets (PostgreSQL, Redis, SeaweedFS: each reads its password or identities from its own 0600 file) start
from an environment with none; the others start through `python -m reki_core.cluster exec NAME`, which reads their
secrets from the 0600 files and execs the program with them in its environment (never on a command line, which `ps`
shows): Airflow's components get Airflow's, the Celery workers also the tasks' (the S3 writer identity, the Connect
token), the Connect server its token and the writer identity, the Spark worker the writer identity (its executors
inherit it: they write the lake's table files through s3a). Spark's master, worker, Connect server and executors authenticate to each other
with a generated secret (`spark.authenticate`). The UI and REST API sign in through the FAB auth manager: an admin,
an operator (trigger, backfill) and a viewer, their generated passwords in `<state_dir>/secrets/cluster_airflow_users.json`.

    python -m reki_core.cluster up | down | status | env      (`make cluster`, `make stop`, `source infra/cluster/env.sh`)
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from reki_core.config import PROJECT_ROOT, Config
from reki_core.localstack import (CONNECT_TOKEN_ENV, LLMServer, SeaweedFS, SparkConnectServer, _write_private,
                                  credential_environment, ensure_airflow_passwords, ensure_connect_token,
                                  ensure_credentials, secrets_dir, service_ports)

SERVICE_NAMES: tuple[str, ...] = ("postgres", "redis", "seaweedfs", "spark-master", "spark-worker", "spark-connect",
                                  "api-server", "scheduler", "dag-processor", "triggerer", "worker", "gpu-worker")
# Started with supervisord, in this order (priority); the Airflow programs start once the metadata DB is migrated.
INFRA_SERVICES = SERVICE_NAMES[:6]
AIRFLOW_SERVICES = SERVICE_NAMES[6:]
# The warm LLM server (`llm.server.enabled`): started with the infrastructure, before Airflow's programs.
LLM_SERVER = "llm-server"


def program_names(cfg: Config) -> tuple[str, ...]:
    """supervisord's programs in start order: SERVICE_NAMES, the LLM server after the Connect server when enabled."""
    llm = (LLM_SERVER,) if cfg.llm.server.enabled else ()
    return INFRA_SERVICES + llm + AIRFLOW_SERVICES
DB_USER = DB_NAME = "airflow"
# The lake's Iceberg JDBC catalog: a database of its own beside Airflow's, on the same server, with its own login
# (the Connect server holds this one, never Airflow's).
CATALOG_DB_NAME = CATALOG_DB_USER = "reki_iceberg"
OS_USER = "reki"  # PostgreSQL refuses to run as root: as root, its server runs as this system user
INSTALL_HINT = "install it with `bash infra/cluster/install.sh` (apt: postgresql, redis-server)"
# Programs started through `exec` (their secrets added to their environment); the others hold none.
WITH_SECRETS = ("spark-worker", "spark-connect", *AIRFLOW_SERVICES)
TASK_RUNNERS = ("worker", "gpu-worker")
FAB_AUTH_MANAGER = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
# The UI's users and their FAB roles: Op may trigger runs and backfills, Viewer only reads.
UI_USERS = {"admin": "Admin", "operator": "Op", "viewer": "Viewer"}
# What supervisord (so every program) keeps of the caller's environment: nothing secret.
KEPT_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "JAVA_HOME", "VIRTUAL_ENV",
            "PYTHONPATH", "REKI_HOME", "REKI_CONFIG", "GX_ANALYTICS_ENABLED", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
            "TOKENIZERS_PARALLELISM", "SPARK_LOCAL_IP", "PYSPARK_PYTHON")
# Airflow's connection to the task logs on the object store: the workers' writes with the writer identity, the API
# server's reads with the read-only one.
TASK_LOGS_CONN = "reki_task_logs"
SECRET_SETTING = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|FERNET|JWT|_KEY$|_CONN|BROKER_URL|RESULT_BACKEND")


class ClusterError(RuntimeError):
    """`make cluster` cannot go on; the message says which service or setting and how to fix it."""


# ------------------------------------------------------------------ layout, credentials


def cluster_dir(cfg: Config) -> Path:
    return cfg.state_dir / "cluster"


def logs_dir(cfg: Config) -> Path:
    return cfg.state_dir / "logs"


def airflow_home(cfg: Config) -> Path:
    return cluster_dir(cfg) / "airflow"


def secrets_file(cfg: Config) -> Path:
    return secrets_dir(cfg.state_dir) / "cluster.json"


def ensure_cluster_secrets(cfg: Config) -> dict[str, str]:
    """The profile's generated credentials (each once): database, broker, supervisord's socket, Airflow's keys,
    Spark's shared secret."""
    from cryptography.fernet import Fernet  # an Airflow dependency

    path = secrets_file(cfg)
    current = json.loads(path.read_text()) if path.is_file() else {}
    generators = {
        "postgres_password": lambda: secrets.token_hex(24), "redis_password": lambda: secrets.token_hex(24),
        "supervisor_password": lambda: secrets.token_hex(16), "fernet_key": lambda: Fernet.generate_key().decode(),
        "jwt_secret": lambda: secrets.token_urlsafe(32), "api_secret_key": lambda: secrets.token_urlsafe(32),
        "spark_auth_secret": lambda: secrets.token_hex(32), "catalog_password": lambda: secrets.token_hex(24)}
    missing = {key: make() for key, make in generators.items() if key not in current}
    if missing:
        _write_private(path, {**current, **missing})
    return {**current, **missing}


def ui_users_file(cfg: Config) -> Path:
    """The UI users' generated passwords, `{user: password}` (0600)."""
    return ensure_airflow_passwords(cfg.state_dir, tuple(UI_USERS), name="cluster_airflow_users.json")


def spark_properties_file(cfg: Config) -> Path:
    """`spark.authenticate` and its generated secret (0600), read by the master, the worker and the Connect server
    (`--properties-file`): the secret stays off every command line; the worker hands it to executors in their
    environment, and a worker or driver without it is refused."""
    path = secrets_dir(cfg.state_dir) / "cluster_spark.conf"
    body = f"spark.authenticate=true\nspark.authenticate.secret={ensure_cluster_secrets(cfg)['spark_auth_secret']}\n"
    # The lake catalog's database login (the Connect server's JdbcCatalog), off the command line too.
    prefix = f"spark.sql.catalog.{cfg.lake.catalog}.jdbc"
    body += f"{prefix}.user={CATALOG_DB_USER}\n{prefix}.password={ensure_cluster_secrets(cfg)['catalog_password']}\n"
    if not path.is_file() or path.read_text() != body:
        _write_private_text(path, body)
    return path


def catalog_uri(cfg: Config) -> str:
    return f"jdbc:postgresql://{cfg.cluster.host_address}:{cfg.cluster.postgres_port}/{CATALOG_DB_NAME}"


def with_cluster_catalog(cfg: Config) -> Config:
    """`cfg` with the lake's catalog in this profile's PostgreSQL (unless lake.catalog_uri names another)."""
    if cfg.lake.catalog_uri:
        return cfg
    return cfg.model_copy(update={"lake": cfg.lake.model_copy(update={"catalog_uri": catalog_uri(cfg)})})


def catalog_environment(cfg: Config) -> dict[str, str]:
    """What a task needs to reach the lake's catalog here (pyiceberg): its URI and the database login."""
    from reki_core.storage.tables import CATALOG_PASSWORD_ENV, CATALOG_USER_ENV

    return {"REKI__LAKE__CATALOG_URI": with_cluster_catalog(cfg).lake.catalog_uri, CATALOG_USER_ENV: CATALOG_DB_USER,
            CATALOG_PASSWORD_ENV: ensure_cluster_secrets(cfg)["catalog_password"]}


def master_url(cfg: Config) -> str:
    return f"spark://127.0.0.1:{cfg.cluster.spark_master_port}"


def database_url(cfg: Config, password: str) -> str:
    return f"postgresql+psycopg2://{DB_USER}:{password}@{cfg.cluster.host_address}:{cfg.cluster.postgres_port}/{DB_NAME}"


def broker_url(cfg: Config, password: str) -> str:
    return f"redis://:{password}@{cfg.cluster.host_address}:{cfg.cluster.redis_port}/0"


def api_url(cfg: Config) -> str:
    return f"http://{cfg.cluster.host_address}:{cfg.cluster.api_port}"


def listen_addresses(cfg: Config) -> list[str]:
    """Where PostgreSQL and Redis listen: loopback, and the address other hosts' workers reach (when set)."""
    return list(dict.fromkeys(["127.0.0.1", cfg.cluster.host_address]))


def serves_other_hosts(cfg: Config) -> bool:
    return cfg.cluster.host_address != "127.0.0.1"


def postgres_bin(tool: str) -> Path:
    """A PostgreSQL server binary from Debian's package: the newest installed major version (15 here), else where
    Debian's 15 puts it (`check_installed` says how to install it)."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"), key=lambda p: int(p.parts[-3]))
    return found[-1] if found else Path("/usr/lib/postgresql/15/bin") / tool


def redis_server() -> str:
    return shutil.which("redis-server") or "/usr/bin/redis-server"


def check_installed() -> None:
    for what, path in (("PostgreSQL's server", postgres_bin("postgres")), ("PostgreSQL's initdb", postgres_bin("initdb")),
                       ("redis-server", Path(redis_server()))):
        if not path.is_file():
            raise ClusterError(f"{what} was not found ({path}): {INSTALL_HINT}")


def _venv_bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


# ------------------------------------------------------------------ what runs


def service_ports_of(cfg: Config) -> dict[str, list[tuple[int, str]]]:
    """Every loopback port each service listens on, with the setting that moves it."""
    from reki_core.spark import connect_endpoint

    c = cfg.cluster
    s3_port = SeaweedFS(cfg.state_dir, cfg.object_store.endpoint_url, cfg.object_store.bucket).port
    return {
        "postgres": [(c.postgres_port, "cluster.postgres_port")],
        "redis": [(c.redis_port, "cluster.redis_port")],
        "seaweedfs": [(s3_port, "object_store.endpoint_url")]
                     + [(p, "object_store.endpoint_url (the ports after it)") for p in service_ports(s3_port).values()],
        "spark-master": [(c.spark_master_port, "cluster.spark_master_port"),
                         (c.spark_master_webui_port, "cluster.spark_master_webui_port")],
        "spark-worker": [(c.spark_worker_webui_port, "cluster.spark_worker_webui_port")],
        "spark-connect": [(connect_endpoint(cfg.spark.connect_url)[1], "spark.connect_url")],
        "api-server": [(c.api_port, "cluster.api_port")],
        **({LLM_SERVER: [(cfg.llm.server.port, "llm.server.port")]} if cfg.llm.server.enabled else {}),
    }


def gpu_worker_python(cfg: Config) -> str:
    return cfg.cluster.gpu_worker_python or sys.executable


def service_commands(cfg: Config) -> dict[str, list[str]]:
    """Each service's argv, as `make cluster` starts it (under supervisord, in SERVICE_NAMES order)."""
    from reki_core.spark import spark_home

    cfg = with_cluster_catalog(cfg)
    c = cfg.cluster
    data = cluster_dir(cfg)
    spark_class = str(spark_home() / "bin" / "spark-class")
    airflow = [_venv_bin("airflow")]
    return {
        "postgres": [str(postgres_bin("postgres")), "-D", str(data / "postgres"), "-p", str(c.postgres_port),
                     "-c", f"listen_addresses={','.join(listen_addresses(cfg))}", "-c", "unix_socket_directories="],
        "redis": [redis_server(), str(data / "redis.conf"), "--port", str(c.redis_port), "--bind", *listen_addresses(cfg)],
        "seaweedfs": SeaweedFS(cfg.state_dir, cfg.object_store.endpoint_url, cfg.object_store.bucket).command(),
        "spark-master": [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                         "--port", str(c.spark_master_port), "--webui-port", str(c.spark_master_webui_port),
                         "--properties-file", str(spark_properties_file(cfg))],
        "spark-worker": [spark_class, "org.apache.spark.deploy.worker.Worker", master_url(cfg), "--host", "127.0.0.1",
                         "--cores", str(c.spark_worker_cores), "--memory", c.spark_worker_memory,
                         "--webui-port", str(c.spark_worker_webui_port), "--work-dir", str(data / "spark-work"),
                         "--properties-file", str(spark_properties_file(cfg))],
        "spark-connect": SparkConnectServer(cfg, master=master_url(cfg),
                                            properties_file=spark_properties_file(cfg)).command(),
        # One address only (uvicorn): the one every worker reaches, this host's included.
        "api-server": [*airflow, "api-server", "--host", c.host_address, "--port", str(c.api_port), "--workers", "1"],
        "scheduler": [*airflow, "scheduler"],
        "dag-processor": [*airflow, "dag-processor"],
        # No log servers (Airflow binds them to every interface): on one machine the api-server reads the task
        # logs from the files directly. Workers on other machines serve theirs (infra/deploy/).
        "triggerer": [*airflow, "triggerer", "--skip-serve-logs"],
        "worker": [*airflow, "celery", "worker", "--queues", c.default_queue, "--concurrency", str(c.worker_concurrency),
                   "--celery-hostname", f"{c.default_queue}@%h", "--skip-serve-logs"],
        "gpu-worker": [gpu_worker_python(cfg), "-m", "airflow", "celery", "worker", "--queues", c.gpu_queue,
                       "--concurrency", "1", "--celery-hostname", f"{c.gpu_queue}@%h", "--skip-serve-logs"],
        # Its command needs the served model's files: only built when the profile runs the server.
        **({LLM_SERVER: LLMServer(cfg).command()} if cfg.llm.server.enabled else {}),
    }


SPARK_ENV = ("SPARK_HOME", "SPARK_LOCAL_IP", "PYSPARK_PYTHON", "PATH", "SPARK_NO_DAEMONIZE", "SPARK_LOG_DIR",
             "SPARK_PID_DIR")


def spark_environment(cfg: Config) -> dict[str, str]:
    """Spark's variables (its home, loopback, this venv's Python, no daemonizing) for the master, the worker, the
    Connect server and the Connect clients: nothing secret."""
    server_env = SparkConnectServer(cfg, master=master_url(cfg)).environment(token="")
    return {key: server_env[key] for key in SPARK_ENV}


def supervisord_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """What supervisord, and so every program, starts with: the caller's environment without any secret (its
    Airflow settings, e.g. infra/env.sh's parallelism, kept unless their name says they may hold one)."""
    base = dict(os.environ if base is None else base)
    return {k: v for k, v in base.items() if k in KEPT_ENV or k.startswith(("LC_", "REKI__"))
            or (k.startswith("AIRFLOW__") and not SECRET_SETTING.search(k))}


def task_environment(cfg: Config) -> dict[str, str]:
    """What the tasks (on the Celery workers) need besides Airflow's settings: the S3 writer identity, the Connect
    token and its Airflow connection, and the LLM endpoint's API key where `make cluster` was given one."""
    from reki_core.spark import connect_endpoint

    token = ensure_connect_token(cfg.state_dir)
    host, port = connect_endpoint(cfg.spark.connect_url)
    env = {**credential_environment(cfg, "writer"), **catalog_environment(cfg)}
    env.update({CONNECT_TOKEN_ENV: token, "AIRFLOW_CONN_SPARK_CONNECT_DEFAULT": json.dumps(
        {"conn_type": "spark_connect", "host": host, "port": port, "password": token})})
    extra = task_secrets_file(cfg)
    return {**env, **(json.loads(extra.read_text()) if extra.is_file() else {})}


def task_secrets_file(cfg: Config) -> Path:
    return secrets_dir(cfg.state_dir) / "cluster_task_env.json"


def task_logs_folder(cfg: Config) -> str:
    return f"s3://{cfg.lake.bucket}/{cfg.cluster.task_logs_prefix.strip('/')}"


def task_logs_environment(cfg: Config, role: str) -> dict[str, str]:
    """Airflow's connection TASK_LOGS_CONN as identity `role` (path-style requests, as SeaweedFS serves them)."""
    creds = ensure_credentials(cfg.state_dir)[role]
    extra = {"endpoint_url": cfg.object_store.endpoint_url, "region_name": cfg.object_store.region,
             "config_kwargs": {"s3": {"addressing_style": "path"}}}
    conn = {"conn_type": "aws", "login": creds.access_key, "password": creds.secret_key, "extra": extra}
    return {f"AIRFLOW_CONN_{TASK_LOGS_CONN.upper()}": json.dumps(conn)}


def s3_writer_environment(cfg: Config) -> dict[str, str]:
    """The writer identity as the AWS SDK reads it (s3a's EnvironmentVariableCredentialsProvider): AWS_* only."""
    return {k: v for k, v in credential_environment(cfg, "writer").items() if k.startswith("AWS_")}


def program_environment(cfg: Config, name: str, base: dict[str, str]) -> dict[str, str]:
    """The environment `exec` starts program `name` with: `base` (supervisord's, no secrets) and its own secrets."""
    if name == "spark-worker":
        # The executors it launches inherit its environment (Spark's worker starts them with it, adding only the
        # application's spark.executorEnv): the writer identity for s3a reaches them there, never through the
        # application's description, which the worker's web UI shows.
        return {**base, **spark_environment(cfg), **s3_writer_environment(cfg)}
    if name == "spark-connect":
        # The writer identity for s3a (the lake's tables), in its environment as the token is.
        return {**base, **spark_environment(cfg), **s3_writer_environment(cfg),
                CONNECT_TOKEN_ENV: ensure_connect_token(cfg.state_dir)}
    if name not in AIRFLOW_SERVICES:
        raise ClusterError(f"{name} holds no secrets: supervisord starts it directly")
    env = airflow_environment(cfg, base)
    if name in TASK_RUNNERS:
        return {**env, **task_environment(cfg), **task_logs_environment(cfg, "writer")}
    return {**env, **task_logs_environment(cfg, "reader")} if name == "api-server" else env


def worker_environment(cfg: Config, state_dir: Path, base: dict[str, str]) -> dict[str, str]:
    """What a gpu-queue worker on another host is given (a deployment hands it over as a secret environment): the
    local gpu worker's settings and secrets, reaching the stack at `cluster.host_address`, with its Airflow home and
    its pipeline state in its own `state_dir`."""
    if not serves_other_hosts(cfg):
        raise ClusterError("cluster.host_address is 127.0.0.1: no other host reaches this profile; set it to an "
                           "address of this host that the worker's host reaches (REKI__CLUSTER__HOST_ADDRESS)")
    env = program_environment(cfg, "gpu-worker", base)
    home = state_dir / "cluster" / "airflow"
    env.update({"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__PLUGINS_FOLDER": str(home / "plugins"),
                "REKI__PATHS__STATE_DIR": str(state_dir)})
    return env


def airflow_environment(cfg: Config, base: dict[str, str] | None = None) -> dict[str, str]:
    """Airflow's settings and secrets on this profile: the environment of its components (`exec`) and of Airflow's
    CLI (`env`), never written to a config file."""
    s = ensure_cluster_secrets(cfg)
    c = cfg.cluster
    home = airflow_home(cfg)
    api = api_url(cfg)

    env = dict(os.environ if base is None else base)
    env.update(spark_environment(cfg))
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"):
        env.pop(key, None)  # the embedded profile's: SQLite's busy timeout, the simple auth manager's passwords
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(home / "plugins"),
        "PYTHONPATH": os.pathsep.join(dict.fromkeys([str(PROJECT_ROOT / "plugins"),
                                                     *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__FERNET_KEY": s["fernet_key"],
        "AIRFLOW__CORE__AUTH_MANAGER": FAB_AUTH_MANAGER,
        "AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FOLDER_PERMISSIONS": "0o700",
        "AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FILE_PERMISSIONS": "0o600",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url(cfg, s["postgres_password"]),
        "AIRFLOW__CELERY__BROKER_URL": broker_url(cfg, s["redis_password"]),
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + database_url(cfg, s["postgres_password"]),
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(c.worker_concurrency),
        # A broker down for minutes (restarted) delays publishing instead of failing the tasks queued meanwhile.
        "AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS": "reki_airflow.celery_config.CELERY_CONFIG",
        "AIRFLOW__CELERY__TASK_PUBLISH_MAX_RETRIES": "600",
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": c.default_queue,
        "AIRFLOW__API__HOST": c.host_address,
        "AIRFLOW__API__PORT": str(c.api_port),
        "AIRFLOW__API__BASE_URL": api,
        "AIRFLOW__API__SECRET_KEY": s["api_secret_key"],
        "AIRFLOW__API_AUTH__JWT_SECRET": s["jwt_secret"],
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(c.task_heartbeat_timeout_s),
        # Task logs on the object store: the workers write them (writer identity), the API server reads them
        # (reader identity), whichever host ran the task. Each holds its own connection (TASK_LOGS_CONN).
        "AIRFLOW__LOGGING__REMOTE_LOGGING": "True",
        "AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER": task_logs_folder(cfg),
        "AIRFLOW__LOGGING__REMOTE_LOG_CONN_ID": TASK_LOGS_CONN,
        # Feature jobs and the Connect server run on the standalone master, not local[*].
        "REKI__SPARK__MASTER": master_url(cfg),
        "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": "spark://127.0.0.1",
                                                  "port": c.spark_master_port}),
    })
    return env


# ------------------------------------------------------------------ supervisord


def _quote(value: str) -> str:
    return value.replace("%", "%%")  # supervisord expands %(name)s in commands


def supervisord_conf(cfg: Config) -> str:
    """One program per service: restarted when it exits, stopped with its whole process group."""
    s = ensure_cluster_secrets(cfg)
    d, logs = cluster_dir(cfg), logs_dir(cfg)
    commands = service_commands(cfg)
    lines = [
        "; generated by reki_core/cluster.py on every `make cluster`: edit that, not this file",
        "[unix_http_server]", f"file={d / 'supervisor.sock'}", "chmod=0700",
        "username=reki", f"password={s['supervisor_password']}", "",
        "[supervisord]", f"logfile={logs / 'cluster-supervisord.log'}", f"pidfile={d / 'supervisord.pid'}",
        f"childlogdir={logs}", f"directory={PROJECT_ROOT}", "logfile_maxbytes=20MB", "user=" + _whoami(),
        "umask=077", "",
        "[rpcinterface:supervisor]", "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]", f"serverurl=unix://{d / 'supervisor.sock'}", "username=reki",
        f"password={s['supervisor_password']}", "",
    ]
    spark_env = ",".join(f'{k}="{_quote(v)}"' for k, v in spark_environment(cfg).items())
    for priority, name in enumerate(program_names(cfg), start=1):
        infra = name in INFRA_SERVICES or name == LLM_SERVER
        command = [sys.executable, "-m", "reki_core.cluster", "exec", name] if name in WITH_SECRETS else commands[name]
        lines += [
            f"[program:{name}]", f"command={_quote(shlex.join(command))}", f"priority={priority * 10}",
            f"autostart={'true' if infra else 'false'}", "autorestart=true", "startsecs=3", "startretries=20",
            "stopasgroup=true", "killasgroup=true", "stopwaitsecs=30",
            # PostgreSQL's fast shutdown; SIGTERM is its "smart" one, which waits for every client to leave.
            f"stopsignal={'INT' if name == 'postgres' else 'TERM'}",
            "redirect_stderr=true", f"stdout_logfile={logs / f'cluster-{name}.log'}", "stdout_logfile_maxbytes=50MB",
            "stdout_logfile_backups=2",
        ]
        if name == "postgres" and os.geteuid() == 0:
            lines.append(f"user={OS_USER}")
        if name in ("spark-master", "spark-worker"):
            lines.append(f"environment={spark_env}")
        if name == LLM_SERVER:
            llm_env = ",".join(f'{k}="{_quote(v)}"' for k, v in LLMServer(cfg).settings_environment().items())
            lines.append(f"environment={llm_env}")
        lines.append("")
    return "\n".join(lines)


def _whoami() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _supervisor_files(cfg: Config) -> tuple[Path, Path]:
    return cluster_dir(cfg) / "supervisord.conf", cluster_dir(cfg) / "supervisord.pid"


def _process_alive(pid: int) -> bool:
    """`pid` runs (a zombie has exited; only its parent's wait is left)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def supervisord_pid(cfg: Config) -> int | None:
    """supervisord's PID while it runs (a number reused by another process after a reboot is not taken for it)."""
    _, pid_file = _supervisor_files(cfg)
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError, IndexError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return None
    return pid if "supervisord" in cmdline else None


def supervisorctl(cfg: Config, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    conf, _ = _supervisor_files(cfg)
    proc = subprocess.run([_venv_bin("supervisorctl"), "-c", str(conf), *args], capture_output=True, text=True)
    # supervisorctl exits 3 for `status` with stopped programs: only a start/stop that failed is an error.
    if check and proc.returncode not in (0, 3):
        raise ClusterError(f"supervisorctl {' '.join(args)} failed: {proc.stdout}{proc.stderr}".strip())
    return proc


def program_pid(cfg: Config, name: str) -> int | None:
    out = supervisorctl(cfg, "pid", name, check=False).stdout.strip()
    return int(out) if out.isdigit() and int(out) > 0 else None


# ------------------------------------------------------------------ preflight


def port_owner(port: int) -> str:
    """Who listens on 127.0.0.1/0.0.0.0:port, as 'pid N (name)' where the system says."""
    import psutil

    try:
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                try:
                    return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
                except psutil.Error:
                    return f"pid {conn.pid}"
    except psutil.Error:
        pass
    return "another process"


def _port_free(port: int, address: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
            return True
        except OSError:
            return False


def check_ports(cfg: Config) -> None:
    """Every port the profile needs is free, or a ClusterError names the first taken one, its owner and the setting."""
    for service, ports in service_ports_of(cfg).items():
        for port, setting in ports:
            if not all(_port_free(port, address) for address in listen_addresses(cfg)):
                env_name = "REKI__" + setting.split(" ")[0].replace(".", "__").upper()
                raise ClusterError(f"port {port} ({service}) is taken by {port_owner(port)}: stop it "
                                   f"(`make stop` stops the embedded stack) or set {setting} ({env_name})")


def _until_it_answers(connect, not_up: type[Exception] | tuple, where: str, log: Path, timeout_s: float,
                      interval_s: float):
    """`connect()`'s result once the service answers; `connect` raises ClusterError itself for a wrong password,
    which no wait mends."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return connect()
        except not_up as exc:
            if time.monotonic() > deadline:
                raise ClusterError(f"{where} did not answer in {timeout_s:.0f} s: {str(exc).strip()}; see {log}") from None
            time.sleep(interval_s)


def check_postgres(cfg: Config, timeout_s: float = 60) -> None:
    """PostgreSQL answers and accepts the generated password; the Airflow database exists."""
    import psycopg2

    s = ensure_cluster_secrets(cfg)
    where = f"PostgreSQL at 127.0.0.1:{cfg.cluster.postgres_port}"

    def connect():
        try:
            return psycopg2.connect(host="127.0.0.1", port=cfg.cluster.postgres_port, user=DB_USER,
                                    password=s["postgres_password"], dbname="postgres", connect_timeout=5)
        except psycopg2.OperationalError as exc:
            if "password authentication failed" in str(exc):
                raise ClusterError(
                    f"{where} rejected the password in {secrets_file(cfg)}: {str(exc).strip()}. Put back the "
                    f"postgres_password its data folder {cluster_dir(cfg) / 'postgres'} was initialised with, or "
                    f"remove that folder (Airflow's metadata is lost) so `make cluster` initialises it again") from None
            raise

    conn = _until_it_answers(connect, psycopg2.OperationalError, where, logs_dir(cfg) / "cluster-postgres.log",
                             timeout_s, interval_s=1)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,))
        if cur.fetchone() is None:
            cur.execute(f"CREATE DATABASE {DB_NAME}")
        # The lake's Iceberg catalog, apart from Airflow's metadata, owned by its own login.
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (CATALOG_DB_USER,))
        verb = "ALTER" if cur.fetchone() else "CREATE"
        cur.execute(f"{verb} ROLE {CATALOG_DB_USER} LOGIN PASSWORD %s", (s["catalog_password"],))
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (CATALOG_DB_NAME,))
        if cur.fetchone() is None:
            cur.execute(f"CREATE DATABASE {CATALOG_DB_NAME} OWNER {CATALOG_DB_USER}")
    conn.close()


def check_redis(cfg: Config, timeout_s: float = 30) -> None:
    """Redis answers and accepts the generated broker password."""
    import redis

    s = ensure_cluster_secrets(cfg)
    where = f"Redis (the Celery broker) at 127.0.0.1:{cfg.cluster.redis_port}"

    def ping():
        try:
            return redis.Redis(host="127.0.0.1", port=cfg.cluster.redis_port, password=s["redis_password"],
                               socket_timeout=5).ping()
        except redis.AuthenticationError as exc:  # a ConnectionError too: caught before the wait sees it
            raise ClusterError(
                f"{where} rejected the redis_password in {secrets_file(cfg)}: {exc}. Put back the password that "
                f"{cluster_dir(cfg) / 'redis.conf'} requires (requirepass), or remove that file so `make cluster` "
                f"writes it again with the password in {secrets_file(cfg)}") from None

    _until_it_answers(ping, redis.ConnectionError, where, logs_dir(cfg) / "cluster-redis.log", timeout_s, interval_s=0.5)


# ------------------------------------------------------------------ first start: data folders


def _service_user() -> tuple[int, int] | None:
    """(uid, gid) PostgreSQL runs as when we are root (created once as a system user), else None."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(OS_USER)
    except KeyError:
        # root's tools live in /usr/sbin, which a minimal PATH (cron, `env -i`) leaves out
        useradd = shutil.which("useradd") or shutil.which("useradd", path="/usr/sbin:/sbin") or "useradd"
        subprocess.run([useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OS_USER],
                       check=True, capture_output=True)
        entry = pwd.getpwnam(OS_USER)
    return entry.pw_uid, entry.pw_gid


def init_postgres(cfg: Config) -> None:
    """initdb (once): scram-sha-256 for every connection, superuser `airflow` with the generated password."""
    data = cluster_dir(cfg) / "postgres"
    if (data / "PG_VERSION").is_file():
        return
    owner = _service_user()
    data.mkdir(parents=True, exist_ok=True)
    pwfile = cluster_dir(cfg) / ".pg-password"
    _write_private_text(pwfile, ensure_cluster_secrets(cfg)["postgres_password"] + "\n")
    try:
        if owner:
            for path in (data, pwfile):
                os.chown(path, *owner)
        os.chmod(data, 0o700)
        proc = subprocess.run(
            [str(postgres_bin("initdb")), "-D", str(data), "-U", DB_USER, f"--pwfile={pwfile}",
             "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C"],
            capture_output=True, text=True, user=owner[0] if owner else None, group=owner[1] if owner else None)
    finally:
        pwfile.unlink(missing_ok=True)
    if proc.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)
        hint = (f" PostgreSQL runs as the system user {OS_USER}: every folder above {data} must let it through "
                f"(chmod o+x), or set paths.state_dir (REKI__PATHS__STATE_DIR) elsewhere."
                if owner and "Permission denied" in proc.stderr else "")
        raise ClusterError(f"initdb failed for {data}: {proc.stderr.strip()[-2000:]}{hint}")


def write_pg_hba(cfg: Config) -> None:
    """Who may connect (read at PostgreSQL's start): loopback, and with `cluster.host_address` set the hosts on its
    subnets; always with the password (scram-sha-256)."""
    path = cluster_dir(cfg) / "postgres" / "pg_hba.conf"
    lines = ["# generated by reki_core/cluster.py on every `make cluster`", "local all all scram-sha-256",
             "host all all 127.0.0.1/32 scram-sha-256", "host all all ::1/128 scram-sha-256"]
    if serves_other_hosts(cfg):
        lines.append("host all all samenet scram-sha-256")
    body = "\n".join(lines) + "\n"
    if not path.is_file() or path.read_text() != body:
        _write_private_text(path, body)  # rewritten in place: initdb's owner (PostgreSQL's user) stays


def init_redis(cfg: Config) -> None:
    """Redis's config (once, 0600): the broker password and an append-only file, so queued tasks survive a restart."""
    path = cluster_dir(cfg) / "redis.conf"
    (cluster_dir(cfg) / "redis").mkdir(parents=True, exist_ok=True)
    if path.is_file():
        return
    body = "\n".join([
        "# generated once by reki_core/cluster.py; the password must match redis_password in " + str(secrets_file(cfg)),
        "bind 127.0.0.1", "protected-mode yes", "daemonize no",
        f"requirepass {ensure_cluster_secrets(cfg)['redis_password']}",
        f"dir {cluster_dir(cfg) / 'redis'}", "appendonly yes", "appendfsync everysec", ""])
    _write_private_text(path, body)


def _write_private_text(path: Path, body: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(body)


# ------------------------------------------------------------------ up / down / status


def _airflow(cfg: Config, env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([_venv_bin("airflow"), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=PROJECT_ROOT)


def _wait(what: str, ready, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(1)
    raise ClusterError(f"{what} did not come up in {timeout_s:.0f} s; see {log}")


def api_healthy(cfg: Config) -> bool:
    try:
        urllib.request.urlopen(f"{api_url(cfg)}/api/v2/monitor/health", timeout=3)
        return True
    except OSError:
        return False


def _listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def up(cfg: Config, echo=print) -> None:
    """Start the profile (or what of it is not running), each step checked, with a message naming the fix. A
    start that fails stops what it started: a failed `make cluster` leaves nothing running."""
    started_here = supervisord_pid(cfg) is None
    try:
        _up(cfg, echo)
    except BaseException:
        if started_here:
            down(cfg, echo=lambda _: None)
        raise


def _up(cfg: Config, echo) -> None:
    os.umask(0o077)  # folders, supervisord's own log and everything its programs write: owner-only, whoever calls
    env = airflow_environment(cfg, supervisord_environment())
    d = cluster_dir(cfg)
    for sub in (d, logs_dir(cfg), airflow_home(cfg), d / "spark-work"):
        sub.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o711)  # PostgreSQL's user must reach its data folder inside; what is secret in here is 0600
    if os.geteuid() == 0:  # ... and pass through the state folder above it (umask 077 made it 0700): x, never r
        os.chmod(cfg.state_dir, stat.S_IMODE(cfg.state_dir.stat().st_mode) | 0o011)
    conf, _ = _supervisor_files(cfg)
    if supervisord_pid(cfg) is None:
        check_installed()
        check_ports(cfg)
        ensure_credentials(cfg.state_dir)
        (cfg.state_dir / "seaweedfs" / "data").mkdir(parents=True, exist_ok=True)
        init_postgres(cfg)
        write_pg_hba(cfg)
        init_redis(cfg)
        _keep_task_secrets(cfg)
        _write_private_text(conf, supervisord_conf(cfg))
        echo(f"==> supervisord ({conf}): postgres, redis, seaweedfs, spark master/worker, spark connect")
        proc = subprocess.run([_venv_bin("supervisord"), "-c", str(conf)], env=supervisord_environment(),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise ClusterError(f"supervisord did not start: {proc.stdout}{proc.stderr}; see "
                               f"{logs_dir(cfg) / 'cluster-supervisord.log'}")
        _wait("supervisord", lambda: supervisord_pid(cfg) is not None and (d / "supervisor.sock").exists(), 30,
              logs_dir(cfg) / "cluster-supervisord.log")
    else:
        supervisorctl(cfg, "start", *INFRA_SERVICES, *((LLM_SERVER,) if cfg.llm.server.enabled else ()))
    check_postgres(cfg)
    check_redis(cfg)
    seaweed = SeaweedFS(cfg.state_dir, cfg.object_store.endpoint_url, cfg.object_store.bucket, cfg.lake.bucket)
    _wait(f"SeaweedFS on {cfg.object_store.endpoint_url}", lambda: _listening(seaweed.port, seaweed.host) and seaweed._bucket_ready(),
          90, logs_dir(cfg) / "cluster-seaweedfs.log")
    migrated = airflow_home(cfg) / ".migrated"
    if not migrated.is_file() or migrated.stat().st_mtime < (PROJECT_ROOT / "requirements.txt").stat().st_mtime:
        echo("==> airflow db migrate (PostgreSQL)")
        proc = _airflow(cfg, env, "db", "migrate")
        if proc.returncode != 0:
            raise ClusterError(f"airflow db migrate failed against PostgreSQL: {(proc.stdout + proc.stderr)[-3000:]}")
        migrated.touch()
    if "gpu" not in _airflow(cfg, env, "pools", "list", "-o", "plain").stdout:
        _airflow(cfg, env, "pools", "set", "gpu", "1", "LLM extraction (GPU) workers")
    _airflow(cfg, env, "pools", "set", cfg.llm.client_pool, str(cfg.llm.client_pool_slots), "LLM server clients (llm.client_pool)")
    users = ui_users_file(cfg)
    # Passwords from the 0600 file, never a command line; FAB stores their hashes.
    proc = subprocess.run([sys.executable, "-m", "reki_airflow.fab_users", str(users)], env=env, capture_output=True,
                          text=True, cwd=PROJECT_ROOT, timeout=300)
    if proc.returncode != 0:
        raise ClusterError(f"creating the UI users (FAB) failed: {(proc.stdout + proc.stderr)[-3000:]}")
    supervisorctl(cfg, "start", "api-server")
    _wait(f"the Airflow api-server on {api_url(cfg)}", lambda: api_healthy(cfg), 180,
          logs_dir(cfg) / "cluster-api-server.log")
    supervisorctl(cfg, "start", *AIRFLOW_SERVICES[1:])
    _wait(f"the Spark master {master_url(cfg)}", lambda: _listening(cfg.cluster.spark_master_port), 90,
          logs_dir(cfg) / "cluster-spark-master.log")
    from reki_core.spark import connect_endpoint

    _wait(f"the Spark Connect server {cfg.spark.connect_url}", lambda: _listening(connect_endpoint(cfg.spark.connect_url)[1]),
          180, logs_dir(cfg) / "cluster-spark-connect.log")
    if cfg.llm.server.enabled:
        _wait(f"the LLM server on {LLMServer(cfg).url}", LLMServer(cfg).ready, cfg.llm.server.start_timeout_s,
              logs_dir(cfg) / f"cluster-{LLM_SERVER}.log")
    echo(status(cfg))
    echo(f"Airflow UI: {api_url(cfg)}  users: {', '.join(UI_USERS)} "
         f"({', '.join(UI_USERS.values())}); passwords in {users}")
    echo(f"Spark master UI: http://127.0.0.1:{cfg.cluster.spark_master_webui_port}  ({master_url(cfg)})")
    echo("CLI against this profile: source infra/env.sh && source infra/cluster/env.sh; stop with: make stop")


def _keep_task_secrets(cfg: Config) -> None:
    """The LLM endpoint's API key, when the shell running `make cluster` has it, for the tasks alone (0600)."""
    name = cfg.llm.engine.api_key_env
    path = task_secrets_file(cfg)
    if os.environ.get(name):
        _write_private(path, {name: os.environ[name]})
    else:
        path.unlink(missing_ok=True)


def exec_program(cfg: Config, name: str) -> None:
    """Replace this process by program `name`, its secrets (read from the 0600 files) in its environment."""
    argv = service_commands(cfg)[name]
    os.execve(argv[0], argv, program_environment(cfg, name, dict(os.environ)))


def down(cfg: Config, echo=print) -> bool:
    """Stop supervisord and every program it started (each with its process group); True when it was running."""
    pid = supervisord_pid(cfg)
    if pid is None:
        return False
    supervisorctl(cfg, "stop", "all", check=False)
    supervisorctl(cfg, "shutdown", check=False)
    deadline = time.monotonic() + 60
    # supervisord removes its pid file before it exits: wait for the process itself
    while time.monotonic() < deadline and _process_alive(pid):
        time.sleep(0.5)
    if _process_alive(pid):
        os.kill(pid, 9)
    echo("cluster profile stopped (supervisord and its programs)")
    return True


def status(cfg: Config) -> str:
    if supervisord_pid(cfg) is None:
        return "cluster profile: not running"
    return supervisorctl(cfg, "status", check=False).stdout.rstrip()


def env_exports(cfg: Config) -> str:
    """`export` lines for a shell that runs Airflow's CLI against this profile (infra/cluster/env.sh evals them)."""
    base = {k: v for k, v in os.environ.items()}
    env = airflow_environment(cfg, base)
    lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()) if base.get(k) != v]
    lines += [f"unset {k}" for k in sorted(set(base) - set(env))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from reki_core.config import load_config

    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "status"
    cfg = load_config()
    try:
        if command == "up":
            up(cfg)
        elif command == "down":
            down(cfg)
        elif command == "status":
            print(status(cfg))
        elif command == "env":
            print(env_exports(cfg))
        elif command == "exec" and len(args) == 2 and args[1] in WITH_SECRETS:
            exec_program(cfg, args[1])
        else:
            print(f"usage: python -m reki_core.cluster up|down|status|env|exec PROGRAM (not {' '.join(args)!r})",
                  file=sys.stderr)
            return 2
    except ClusterError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
