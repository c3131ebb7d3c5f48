"""Spark sessions, one set of settings for all of them: the warm Spark Connect server's clients (the DAG's feature
tasks, the benchmark), a classic in-process session (tests, `spark-submit` of a job's main), the Connect server's
own settings, and the driver JVM options of spark-submitted jobs (with the class archive `reki setup` builds).

pyspark is imported inside the functions: `reki_core` modules stay importable at DAG-parse time.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from reki_core.config import Config

if TYPE_CHECKING:
    import subprocess

    from pyspark.sql import SparkSession


def spark_home() -> Path:
    """The Spark distribution inside the pyspark install (bin/, sbin/, jars/)."""
    import pyspark

    return Path(pyspark.__file__).parent


def session_conf(cfg: Config) -> dict[str, str]:
    """Runtime SQL settings of every session, classic or Connect (a Connect client sets them on its session)."""
    return {
        "spark.sql.shuffle.partitions": str(cfg.spark.shuffle_partitions),
        # Timestamps are epoch seconds; day boundaries are UTC everywhere in the lake.
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.sources.partitionOverwriteMode": "dynamic",
        "spark.sql.adaptive.enabled": "true",
        # The lake is a local folder: listing a few hundred day partitions on the driver beats a 1-task-per-folder job.
        "spark.sql.sources.parallelPartitionDiscovery.threshold": "4096",
    }


def engine_conf(cfg: Config) -> dict[str, str]:
    """Settings fixed when the driver starts (a classic session's, or the Connect server's), with the lake's Iceberg
    catalog (`lake.catalog`: pinned jars, extensions, s3a; reki_core/storage/tables.py)."""
    from reki_core.storage.tables import spark_catalog_conf

    return {
        **spark_catalog_conf(cfg),
        "spark.default.parallelism": str(cfg.spark.shuffle_partitions),
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        # What Spark writes to the lake is its owner's alone (Hadoop's own umask, 022, ignores the process's).
        "spark.hadoop.fs.permissions.umask-mode": "077",
    }


# What pyspark sets in os.environ once this process opened a Connect session; left there, every later classic
# session of the process (a test run, a benchmark) fails with CONNECT_URL_NOT_SET.
CONNECT_MODE_FLAGS = ("SPARK_CONNECT_MODE_ENABLED", "SPARK_REMOTE")


def get_spark(cfg: Config, app_name: str, master: str | None = None, java_options: str = "") -> "SparkSession":
    """A classic in-process SparkSession for `app_name`: master from `cfg.spark.master` unless spark-submit already
    set one; `java_options` for the JVM it starts (none when spark-submit started it). The DAG never uses one: its
    feature tasks are Connect clients (`connect_session`)."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    for flag in CONNECT_MODE_FLAGS:  # a classic session is asked for, whatever an earlier Connect session left
        os.environ.pop(flag, None)
    # Python workers (the clusters job's grouped split) run this interpreter, with its numpy and pyarrow.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    # spark-submit passes --master through the JVM conf; an explicit argument or the config fills the gap.
    submitted_master = SparkConf().get("spark.master", None)
    if master or not submitted_master:
        builder = builder.master(master or cfg.spark.master)
    builder = builder.config("spark.driver.memory", cfg.spark.driver_memory)
    if java_options:
        builder = builder.config("spark.driver.extraJavaOptions", java_options)
    for key, value in {**engine_conf(cfg), **session_conf(cfg)}.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


# ------------------------------------------------------------------ Spark Connect


class SparkConnectUnavailable(ConnectionError):
    """The Spark Connect server cannot be reached (down, or not started): the message says how to start it."""


def connect_endpoint(url: str) -> tuple[str, int]:
    """Host and port of an `sc://host:port/;params` URL (15002 when it names no port)."""
    parsed = urlparse(url)
    if parsed.scheme != "sc" or not parsed.hostname:
        raise ValueError(f"not a Spark Connect URL (sc://host:port): {redact(url)}")
    return parsed.hostname, parsed.port or 15002


def redact(url: str) -> str:
    """`url` without its parameters (a token must never reach a log or an error)."""
    parsed = urlparse(url)
    return f"{parsed.scheme}://{parsed.netloc}"


def unreachable_message(url: str, master: str | None = None) -> str:
    on = f" (its Spark master: {master})" if master else ""
    return (f"the Spark Connect server {redact(url)} is not reachable{on}: start it with `reki stack up` "
            f"(`make airflow` and `make run` do; `make cluster` on the cluster profile), or point spark.connect_url "
            f"(REKI__SPARK__CONNECT_URL) at a running one; its log is .reki/logs/spark-connect.log "
            f"(.reki/logs/cluster-spark-connect.log on the cluster profile)")


def server_conf(cfg: Config, host: str, port: int) -> dict[str, str]:
    """The Connect server's `--conf` settings: bound to `host:port`, the sessions' defaults, logging."""
    java_options = cfg.spark.connect_java_options.split()
    if cfg.spark.log_config is not None:
        java_options.append(f"-Dlog4j2.configurationFile={cfg.resolve(cfg.spark.log_config).as_uri()}")
    conf = {
        "spark.connect.grpc.binding.address": host,
        "spark.connect.grpc.binding.port": str(port),
        # A client killed outright (SIGKILL) cannot release its session: the server drops it after this idle time.
        "spark.connect.session.manager.defaultSessionTimeout": "15m",
        **engine_conf(cfg),
        **session_conf(cfg),
    }
    return {**conf, "spark.driver.extraJavaOptions": " ".join(java_options)} if java_options else conf


def task_session_id() -> str:
    """A new Connect session id (a UUID, as the server requires) for one task try: a retry never sees the temp views
    of the try before, and the server refuses an id once its session was released, so an id is never reused."""
    return str(uuid.uuid4())


def _retry_policies(retry_s: float):
    """PySpark's own retry policy, bounded: it waits at least 10 minutes for a lost server by default."""
    from pyspark.sql.connect.client.retries import DefaultPolicy

    initial_ms, multiplier, max_ms = 50, 4.0, 5000
    waited, retries = 0.0, 0
    while waited < retry_s * 1000:
        waited += min(initial_ms * multiplier ** retries, max_ms)
        retries += 1
    return [DefaultPolicy(max_retries=retries, initial_backoff=initial_ms, backoff_multiplier=multiplier,
                          max_backoff=max_ms)]


def connection_lost(exc: BaseException) -> bool:
    """Whether `exc` (or what it chains) is the Connect server going away, rather than an error of the job."""
    import grpc

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ == "RetriesExceeded":
            return True
        if isinstance(exc, grpc.RpcError) and exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            return True
        if "StatusCode.UNAVAILABLE" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def connect_session(cfg: Config, url: str | None = None, session_id: str | None = None) -> "SparkSession":
    """A new Spark Connect session on `url` (default `cfg.spark.connect_url`). The token is the URL's `token`
    parameter (the Airflow connection's URL carries it) or the SPARK_CONNECT_AUTHENTICATE_TOKEN environment
    variable. An unreachable server fails at once, naming the URL and how to start it."""
    import socket

    from pyspark.sql import SparkSession

    url = url or cfg.spark.connect_url
    host, port = connect_endpoint(url)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        raise SparkConnectUnavailable(unreachable_message(url, cfg.spark.master)) from exc
    remote = url if session_id is None else f"{url.rstrip('/')}{'' if ';' in url else '/'};session_id={session_id}"
    try:
        session = SparkSession.builder.remote(remote).create()
        session.client.set_retry_policies(_retry_policies(cfg.spark.connect_retry_s))
        for key, value in session_conf(cfg).items():
            session.conf.set(key, value)
    except Exception as exc:
        if connection_lost(exc):
            raise SparkConnectUnavailable(unreachable_message(url, cfg.spark.master)) from exc
        raise
    return session


@contextmanager
def connect_client(cfg: Config, url: str | None = None, session_id: str | None = None,
                   tag: str | None = None) -> Iterator["SparkSession"]:
    """A Connect session for one unit of work (a task try), released at the end whatever happens: the server drops
    its temp views and cached frames. Its operations carry `tag` (`interruptTag` stops them). A server lost
    mid-way raises `SparkConnectUnavailable`, naming the URL."""
    session = connect_session(cfg, url, session_id)
    url = url or cfg.spark.connect_url
    if tag:
        session.addTag(tag)
    try:
        yield session
    except Exception as exc:
        if connection_lost(exc):
            raise SparkConnectUnavailable(
                f"lost the Spark Connect server mid-way: {unreachable_message(url, cfg.spark.master)}") from exc
        raise
    finally:
        try:
            session.stop()  # releases the session on the server
        except Exception as exc:  # a server already gone has nothing left to release
            print(f"WARNING: releasing the Spark Connect session failed: {type(exc).__name__}", file=sys.stderr)
        disarm_finalizer(session)


def disarm_finalizer(session: "SparkSession") -> None:
    """Keep a stopped session's finalizer from closing its client a second time. pyspark's `SparkSession.__del__`
    closes the client, and closing any client shuts down the result-release thread pool that every client of the
    process shares, waiting for it (fixed upstream by SPARK-55362 and SPARK-55406, not in pyspark 4.1.4). A stopped
    session is freed by the cyclic garbage collector (it holds a cycle through its catalog) at any point of later work
    in the same process: run inside a live query's stream, that wait hung `airflow dags test`, which runs every
    task in one process, for good. `stop()` has closed the client already; there is nothing left to close."""
    try:
        session.client.close = lambda: None
    except Exception:  # noqa: BLE001 - a session without a client has no finalizer work either
        pass


@contextmanager
def session_or_own(cfg: Config, spark: "SparkSession | None", app_name: str) -> Iterator["SparkSession"]:
    """`spark`, else the active session, else a classic session of its own, stopped at the end: how callers outside
    the DAG (the in-process pipeline driver, the benchmarks) run the DAG's Spark jobs."""
    own = None
    if spark is None:
        from pyspark.sql import SparkSession

        spark = SparkSession.getActiveSession()
        if spark is None:
            spark = own = get_spark(cfg, app_name)
    try:
        yield spark
    finally:
        if own is not None:
            own.stop()


CLASS_ARCHIVE = "jvm/spark-classes.jsa"


def class_archive(cfg: Config) -> Path:
    """Where `reki setup` keeps the JVM class archive of spark-submitted jobs."""
    return cfg.state_dir / CLASS_ARCHIVE


def submit_java_options(cfg: Config) -> str:
    """Driver JVM options of spark-submitted jobs: the configured ones, the log configuration, and the class
    archive once set-up has built it (a JVM that cannot use an archive warns and loads the classes itself)."""
    options = cfg.spark.driver_java_options.split()
    if cfg.spark.log_config is not None:
        options.append(f"-Dlog4j2.configurationFile={cfg.resolve(cfg.spark.log_config).as_uri()}")
    archive = class_archive(cfg)
    if cfg.spark.class_archive and archive.is_file():
        options.append(f"-XX:SharedArchiveFile={archive}")
    return " ".join(options)


def submit_conf(cfg: Config) -> dict[str, str]:
    """The `--conf` settings of a spark-submitted job (a user's, the benchmark's cold-JVM comparison)."""
    from reki_core.jars import spark_jar_conf

    # The connector jars go on the class path at the JVM's start: a session's settings come too late for them.
    conf = {"spark.sql.shuffle.partitions": str(cfg.spark.shuffle_partitions), "spark.sql.session.timeZone": "UTC",
            **spark_jar_conf()}
    java_options = submit_java_options(cfg)
    return {**conf, "spark.driver.extraJavaOptions": java_options} if java_options else conf


def spark_submit(cfg: Config, application: Path, args: list[str], conf: dict[str, str],
                 timeout_s: int) -> "subprocess.CompletedProcess[str]":
    """`spark-submit` of this venv on `cfg.spark.master`, output captured (set-up's archive run, the benchmark)."""
    import subprocess

    venv_bin = Path(sys.executable).parent
    settings = [arg for key, value in conf.items() for arg in ("--conf", f"{key}={value}")]
    cmd = [str(venv_bin / "spark-submit"), "--master", cfg.spark.master, "--driver-memory", cfg.spark.driver_memory,
           *settings, str(application), *args]
    # spark-submit finds pyspark's SPARK_HOME through the `python3` on PATH.
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "PYSPARK_PYTHON": sys.executable,
           "SPARK_LOCAL_IP": "127.0.0.1"}
    for flag in CONNECT_MODE_FLAGS:
        env.pop(flag, None)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)


def _archive_fingerprint() -> str:
    """What an archive is only valid for: this JVM build and the exact Spark jars on the class path."""
    import hashlib
    import subprocess

    import pyspark

    java = subprocess.run(["java", "-version"], capture_output=True, text=True, check=True).stderr
    jars = sorted((Path(pyspark.__file__).parent / "jars").glob("*.jar"))
    listing = "\n".join(f"{j.name} {j.stat().st_size} {j.stat().st_mtime_ns}" for j in jars)
    return hashlib.sha256(f"{java}\n{listing}".encode()).hexdigest()


def ensure_class_archive(cfg: Config, timeout_s: int = 900) -> tuple[Path, bool]:
    """Build the class archive of spark-submitted jobs unless one matches this JVM and these jars.

    A training run (`infra/spark_class_archive.py`, every feature job on a small synthetic lake) is submitted
    with `-XX:ArchiveClassesAtExit`: the JVM writes every class it loaded. Later submits map that archive,
    which saves a few seconds of each job's start. Returns (path, whether it was built now); raises
    `RuntimeError` when the training run fails or writes no archive (a JRE without class data sharing).
    Two set-ups at once (`make test` beside `make airflow`) take turns: the second finds the archive built.
    """
    import fcntl
    import shutil
    import tempfile

    from reki_core.config import PROJECT_ROOT

    archive = class_archive(cfg)
    stamp = archive.with_suffix(".fingerprint")
    fingerprint = _archive_fingerprint()
    archive.parent.mkdir(parents=True, exist_ok=True)
    with open(archive.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if archive.is_file() and stamp.is_file() and stamp.read_text() == fingerprint:
            return archive, False
        with tempfile.TemporaryDirectory(dir=archive.parent, prefix=".building-") as tmp:
            partial = Path(tmp) / archive.name
            options = " ".join([*cfg.spark.driver_java_options.split(), f"-XX:ArchiveClassesAtExit={partial}"])
            result = spark_submit(cfg, PROJECT_ROOT / "infra/spark_class_archive.py", [],
                                  {"spark.driver.extraJavaOptions": options}, timeout_s)
            if result.returncode != 0 or not partial.is_file():
                raise RuntimeError(f"building the JVM class archive {archive} failed (exit {result.returncode}, "
                                   f"{'no archive written' if result.returncode == 0 else 'see below'}):\n"
                                   f"{result.stderr[-3000:]}")
            shutil.move(partial, archive)  # a rename: a submit never maps a half-written archive
        stamp.write_text(fingerprint)
    return archive, True
