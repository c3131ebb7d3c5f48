"""The driver JVM options of spark-submitted jobs and the class archive behind them (`reki_core.spark`).

The archive is opt-in (`spark.class_archive`); its real build and a submit that maps it run in `bench/spark_prep.py`.
"""

import subprocess

import pytest

from reki_core import spark as spark_module
from reki_core.config import PROJECT_ROOT, load_config


def _cfg(tmp_path, **env):
    return load_config(PROJECT_ROOT / "conf/reki.yaml", environ={"REKI__PATHS__STATE_DIR": str(tmp_path), **env})


def test_archive_is_used_only_once_built_and_while_enabled(tmp_path):
    cfg = _cfg(tmp_path, REKI__SPARK__CLASS_ARCHIVE="true")
    before = spark_module.submit_java_options(cfg)
    assert "SharedArchiveFile" not in before  # nothing built yet: the JVM loads its classes itself
    assert before.startswith(cfg.spark.driver_java_options)
    assert f"-Dlog4j2.configurationFile={(PROJECT_ROOT / 'conf/spark-log4j2.properties').as_uri()}" in before.split()

    archive = spark_module.class_archive(cfg)
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"archive")
    assert f"-XX:SharedArchiveFile={archive}" in spark_module.submit_java_options(cfg).split()
    disabled = _cfg(tmp_path, REKI__SPARK__CLASS_ARCHIVE="false", REKI__SPARK__LOG_CONFIG="null")
    assert spark_module.submit_java_options(disabled) == cfg.spark.driver_java_options
    # What a spark-submitted job gets (README: running a job by hand): the options beside the session settings.
    from reki_core.jars import spark_jar_conf

    assert spark_module.submit_conf(cfg) == {"spark.sql.shuffle.partitions": str(cfg.spark.shuffle_partitions),
                                             "spark.sql.session.timeZone": "UTC", **spark_jar_conf(),
                                             "spark.driver.extraJavaOptions": spark_module.submit_java_options(cfg)}


def test_archive_is_rebuilt_only_when_the_jvm_or_the_jars_change(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    fingerprint = {"value": "jdk-17 + jars A"}
    submits = []

    def fake_submit(cmd, **kwargs):  # the seam: what the training run's JVM does at exit
        submits.append(cmd)
        out = next(o for o in " ".join(cmd).split() if o.startswith("-XX:ArchiveClassesAtExit="))
        with open(out.split("=", 1)[1], "wb") as fh:
            fh.write(f"classes for {fingerprint['value']}".encode())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(spark_module, "_archive_fingerprint", lambda: fingerprint["value"])
    monkeypatch.setattr(subprocess, "run", fake_submit)
    archive, built = spark_module.ensure_class_archive(cfg)
    assert built and archive.read_bytes() == b"classes for jdk-17 + jars A"
    assert submits[0][-1] == str(PROJECT_ROOT / "infra/spark_class_archive.py")
    assert spark_module.ensure_class_archive(cfg) == (archive, False) and len(submits) == 1
    fingerprint["value"] = "jdk-17 + jars B"  # e.g. pyspark reinstalled
    assert spark_module.ensure_class_archive(cfg) == (archive, True)
    assert archive.read_bytes() == b"classes for jdk-17 + jars B"
    assert sorted(p.name for p in archive.parent.iterdir()) == sorted(
        [archive.name, "spark-classes.fingerprint", "spark-classes.lock"])  # no half-built archive left


def test_a_failed_training_run_keeps_the_previous_archive(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    archive = spark_module.class_archive(cfg)
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"previous")
    monkeypatch.setattr(spark_module, "_archive_fingerprint", lambda: "new")
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "OutOfMemoryError"))
    with pytest.raises(RuntimeError, match="OutOfMemoryError") as err:
        spark_module.ensure_class_archive(cfg)
    assert str(archive) in str(err.value)
    assert archive.read_bytes() == b"previous"


def test_a_jre_that_writes_no_archive_is_reported(tmp_path, monkeypatch):
    """A JRE without class data sharing exits 0 and writes nothing: set-up is told, and warns."""
    cfg = _cfg(tmp_path)
    monkeypatch.setattr(spark_module, "_archive_fingerprint", lambda: "jre")
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, "", "CDS is disabled"))
    with pytest.raises(RuntimeError, match="no archive written"):
        spark_module.ensure_class_archive(cfg)
    assert not spark_module.class_archive(cfg).exists()
    assert "SharedArchiveFile" not in spark_module.submit_java_options(cfg)
