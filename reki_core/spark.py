"""The one SparkSession factory, shared by the Spark jobs, the benchmark and the tests, and the driver JVM
options of spark-submitted jobs (with the class archive that `reki setup` builds for them).

pyspark is imported inside the function: `reki_core` modules stay importable at DAG-parse time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from reki_core.config import Config

if TYPE_CHECKING:
    import subprocess

    from pyspark.sql import SparkSession


def get_spark(cfg: Config, app_name: str, master: str | None = None) -> "SparkSession":
    """A SparkSession for `app_name`: master from `cfg.spark.master` unless spark-submit already set one."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    # Python workers (the clusters job's grouped split) run this interpreter, with its numpy and pyarrow.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    # spark-submit passes --master through the JVM conf; an explicit argument or the config fills the gap.
    submitted_master = SparkConf().get("spark.master", None)
    if master or not submitted_master:
        builder = builder.master(master or cfg.spark.master)
    return (
        builder.config("spark.driver.memory", cfg.spark.driver_memory)
        .config("spark.sql.shuffle.partitions", str(cfg.spark.shuffle_partitions))
        .config("spark.default.parallelism", str(cfg.spark.shuffle_partitions))
        # Timestamps are epoch seconds; day boundaries are UTC everywhere in the lake.
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.sources.partitionOverwriteMode", "dynamic")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.adaptive.enabled", "true")
        # The lake is a local folder: listing a few hundred day partitions on the driver beats a 1-task-per-folder job.
        .config("spark.sql.sources.parallelPartitionDiscovery.threshold", "4096")
        .getOrCreate()
    )


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
    """The `--conf` settings of every spark-submitted job (the DAG's tasks, the benchmark's timed runs)."""
    conf = {"spark.sql.shuffle.partitions": str(cfg.spark.shuffle_partitions), "spark.sql.session.timeZone": "UTC"}
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
