"""The lake's table settings, built in one place (reki_core/storage/tables.py) for Spark and for pyiceberg."""

from __future__ import annotations

import pytest

from reki_core.storage import tables
from tests.conftest import make_config


@pytest.fixture
def cfg(tmp_path):
    return make_config(tmp_path, REKI__OBJECT_STORE__ENDPOINT_URL="http://127.0.0.1:8333",
                       REKI__LAKE__BUCKET="reki-lake")


def _catalog_conf(cfg, monkeypatch):
    import reki_core.jars

    monkeypatch.setattr(reki_core.jars, "spark_jar_conf", lambda: {"spark.driver.extraClassPath": "/cache/a.jar"})
    return tables.spark_catalog_conf(cfg)


def test_spark_catalog_is_iceberg_over_jdbc_in_its_own_sqlite_file(cfg, monkeypatch, tmp_path):
    conf = _catalog_conf(cfg, monkeypatch)
    assert conf["spark.sql.catalog.lake"] == "org.apache.iceberg.spark.SparkCatalog"
    assert conf["spark.sql.catalog.lake.catalog-impl"] == "org.apache.iceberg.jdbc.JdbcCatalog"
    assert conf["spark.sql.catalog.lake.uri"] == f"jdbc:sqlite:{tmp_path / 'state/catalog/iceberg.sqlite'}"
    assert (tmp_path / "state/catalog").is_dir()  # sqlite-jdbc creates the file, not its folder
    assert conf["spark.sql.catalog.lake.warehouse"] == "s3a://reki-lake/warehouse"
    assert conf["spark.sql.extensions"] == tables.ICEBERG_EXTENSIONS
    assert "airflow" not in conf["spark.sql.catalog.lake.uri"]


def test_s3a_is_path_style_capped_and_takes_credentials_from_the_environment(cfg, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDWRITER")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    conf = _catalog_conf(cfg, monkeypatch)
    assert conf["spark.hadoop.fs.s3a.endpoint"] == "http://127.0.0.1:8333"
    assert conf["spark.hadoop.fs.s3a.path.style.access"] == "true"
    assert conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] == "false"
    assert conf["spark.hadoop.fs.s3a.aws.credentials.provider"].endswith("EnvironmentVariableCredentialsProvider")
    assert conf["spark.hadoop.fs.s3a.attempts.maximum"] == conf["spark.hadoop.fs.s3a.retry.limit"] == "2"
    assert conf["spark.hadoop.fs.s3a.connection.establish.timeout"] == "3000"
    # Settings reach command lines (--conf): no credential among them.
    assert not any("AKIDWRITER" in v or "very-secret" in v for v in conf.values())
    assert not any("access.key" in k or "secret" in k for k in conf)


def test_pyiceberg_uses_the_same_database(cfg, tmp_path):
    assert tables.sqlalchemy_uri(cfg) == f"sqlite:///{tmp_path / 'state/catalog/iceberg.sqlite'}"


def test_the_cluster_catalog_is_postgresql_with_the_login_from_the_environment(tmp_path, monkeypatch):
    cfg = make_config(tmp_path, REKI__LAKE__CATALOG_URI="jdbc:postgresql://127.0.0.1:5433/reki_iceberg")
    monkeypatch.setenv(tables.CATALOG_USER_ENV, "airflow")
    monkeypatch.setenv(tables.CATALOG_PASSWORD_ENV, "pw")
    assert tables.jdbc_uri(cfg) == "jdbc:postgresql://127.0.0.1:5433/reki_iceberg"
    assert tables.sqlalchemy_uri(cfg) == "postgresql+psycopg2://airflow:pw@127.0.0.1:5433/reki_iceberg"
    assert tables.catalog_secret_conf(cfg) == {"spark.sql.catalog.lake.jdbc.user": "airflow",
                                               "spark.sql.catalog.lake.jdbc.password": "pw"}


def test_an_unsupported_catalog_database_is_named(tmp_path):
    cfg = make_config(tmp_path, REKI__LAKE__CATALOG_URI="jdbc:mysql://db/x")
    with pytest.raises(ValueError, match="lake.catalog_uri 'jdbc:mysql://db/x'"):
        tables.sqlalchemy_uri(cfg)


def test_pyiceberg_reaches_the_store_spark_does(cfg, monkeypatch):
    """The config's endpoint for both ends, whatever AWS_ENDPOINT_URL another identity's shell exports."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    access = tables.lake_access(cfg, access_key="AKID", secret_key="s")
    assert access.endpoint_url == cfg.object_store.endpoint_url == "http://127.0.0.1:8333"
    assert access.bucket == "reki-lake"


def test_an_orphan_age_under_a_day_is_refused_naming_the_setting(tmp_path):
    # Iceberg's procedure refuses it too, but only at night, in the maintenance DAG: the config says so at load.
    from reki_core.config import ConfigError

    with pytest.raises(ConfigError, match="lake.maintenance.orphan_age_hours"):
        make_config(tmp_path, REKI__LAKE__MAINTENANCE__ORPHAN_AGE_HOURS="1")
    assert make_config(tmp_path).lake.maintenance.orphan_age_hours >= 24


# ------------------------------------------------------------------ the deployed Connect servers' properties file


def test_the_settings_and_the_login_are_appended_to_an_owner_only_properties_file(tmp_path, monkeypatch):
    """`reki lake spark-conf`: after the spark.authenticate lines already there, the catalog's settings and login;
    a file others may read is refused before anything is written into it."""
    import stat

    from click.testing import CliRunner

    from reki_core.cli import main

    monkeypatch.setenv("REKI__PATHS__STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("REKI__LAKE__CATALOG_URI", "jdbc:postgresql://db:5432/reki_iceberg")
    monkeypatch.setenv(tables.CATALOG_USER_ENV, "reki_iceberg")
    monkeypatch.setenv(tables.CATALOG_PASSWORD_ENV, "catalog-pw")
    import reki_core.jars

    monkeypatch.setattr(reki_core.jars, "spark_jar_conf",
                        lambda: {"spark.driver.extraClassPath": "/opt/reki/jars/a.jar:/opt/reki/jars/b.jar"})
    path = tmp_path / "spark.conf"
    path.write_text("spark.authenticate=true\n")
    path.chmod(0o600)
    result = CliRunner().invoke(main, ["lake", "spark-conf", "--append", str(path)])
    assert result.exit_code == 0, result.output
    assert "catalog-pw" not in result.output and str(path) in result.output
    lines = path.read_text().splitlines()
    assert lines[0] == "spark.authenticate=true"
    props = dict(line.split("=", 1) for line in lines)
    assert props["spark.sql.catalog.lake.uri"] == "jdbc:postgresql://db:5432/reki_iceberg"
    assert props["spark.sql.catalog.lake.jdbc.password"] == "catalog-pw"
    assert props["spark.driver.extraClassPath"] == "/opt/reki/jars/a.jar:/opt/reki/jars/b.jar"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    fresh = tmp_path / "new.conf"  # created owner-only, whatever the umask
    tables.append_spark_properties(make_config(tmp_path), fresh)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    assert "spark.sql.catalog.lake=org.apache.iceberg.spark.SparkCatalog" in fresh.read_text().splitlines()

    readable = tmp_path / "readable.conf"
    readable.write_text("spark.authenticate=true\n")
    readable.chmod(0o644)
    result = CliRunner().invoke(main, ["lake", "spark-conf", "--append", str(readable)])
    assert result.exit_code != 0 and "readable by its owner alone" in result.output
    assert readable.read_text() == "spark.authenticate=true\n"


def test_properties_lines_escape_backslashes_and_refuse_line_breaks():
    assert tables.properties_lines({"a.b": r"C:\x", "c": "d=e"}) == "a.b=C:\\\\x\nc=d=e\n"
    with pytest.raises(ValueError, match="Spark setting k"):
        tables.properties_lines({"k": "one\nspark.other=two"})


def test_the_lake_bucket_command_names_the_missing_identity(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from reki_core.cli import main

    monkeypatch.setenv("REKI__PATHS__STATE_DIR", str(tmp_path / "state"))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(main, ["lake", "bucket"])
    assert result.exit_code != 0 and "AWS_ACCESS_KEY_ID" in result.output


def test_a_process_without_the_connector_jars_opens_the_lake(monkeypatch, tmp_path):
    """A gpu worker's image carries no Spark jars: its tasks name the catalog without them; a Spark driver still
    asks for them."""
    from reki_core.jars import JarError
    from reki_core.storage.lake import lake_of

    monkeypatch.setenv("REKI_JAR_CACHE", str(tmp_path / "no-jars"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKID")  # the task's identity, as a worker's environment holds it
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    cfg = make_config(tmp_path, REKI__LAKE__TABLES_IN_STORE="true", REKI__OBJECT_STORE__ENDPOINT_URL="http://127.0.0.1:8333")
    lake = lake_of(cfg)
    assert lake.store is not None and lake.spark_catalog_conf()["spark.sql.catalog.lake.uri"].startswith("jdbc:sqlite:")
    assert not any("jar" in key for key in lake.spark_catalog_conf())
    with pytest.raises(JarError, match="not in the jar cache"):
        tables.spark_catalog_conf(cfg)
