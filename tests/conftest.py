"""Shared fixtures: a throw-away config and lake, the real MovieLens-100K cache, a real SeaweedFS, a real Spark
Connect server."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from reki_core.llm.smoke_model import SMOKE_LLM_ENV

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

# Plumbing tests (faults, backfills, the DAG) run the smoke model in-process: seconds, not minutes. The real model
# through the warm server (conf/reki.yaml's default) runs where a test asks for it (tests/integration/test_real_llm.py).
# Set for this process and for what it starts (Airflow, shard subprocesses); make_config applies them too.
SMOKE_LLM = {
    **SMOKE_LLM_ENV,
    "REKI__LLM__SAMPLING__MAX_TOKENS": "48",
    "REKI__SCENARIO_OVERRIDES": "{}",  # the scenario's own extraction mode (conf/reki.yaml picks collective)
}
for _key, _value in SMOKE_LLM.items():
    os.environ.setdefault(_key, _value)

def _shim_pandas_on_spark() -> None:
    """pyspark 4.1's pandas-on-Spark does not import under pandas 3, and `assertDataFrameEqual` imports it
    unconditionally (it only uses it for pandas inputs). Stand in placeholders so Spark-frame comparisons run."""
    try:
        import pyspark.pandas  # noqa: F401
    except ImportError:
        class _NeverAFrame:  # no object is an instance: the pandas branch is never taken
            pass

        sys.modules["pyspark.pandas"] = types.SimpleNamespace(DataFrame=_NeverAFrame)
        sys.modules["pyspark.testing.pandasutils"] = types.SimpleNamespace(PandasOnSparkTestUtils=None)


_shim_pandas_on_spark()

from reki_core.config import PROJECT_ROOT, Config, load_config  # noqa: E402
from reki_core.localstack import (  # noqa: E402,F401
    CONNECT_TOKEN_ENV,
    SeaweedFS,
    SparkConnectServer,
    ensure_connect_token,
    ensure_credentials,
    free_port_block,
)
from reki_core.spark import connect_endpoint  # noqa: E402
from reki_core.storage.lake import Lake  # noqa: E402


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    # SIGTERM (a CI timeout, infra/test.sh stopping its suites) interrupts like Ctrl-C, so fixture teardown
    # still stops the SeaweedFS and Airflow processes the tests started.
    signal.signal(signal.SIGTERM, _interrupt)
    # py4j logs "Closing down clientserver connection" from a finaliser at interpreter exit, after pytest
    # has closed the stream its log capture writes to: a "--- Logging error ---" traceback in every CI log.
    logging.getLogger("py4j").setLevel(logging.WARNING)
    # Each test's scratch lake keeps its tables in its own folder (no store to start for a unit test); the processes
    # a test starts (Airflow, spark-submit) inherit it. The lake on the store has its own tests (test_lake_on_store).
    os.environ.setdefault("REKI__LAKE__TABLES_IN_STORE", "false")


def copy_lake(source: str | Path, dest: str | Path, dirs_exist_ok: bool = False) -> Lake:
    """A copy of a test lake's folder whose Iceberg catalog answers to the copy's name (its rows are keyed by the
    catalog's name). Table metadata names absolute paths: the copy reads the source's files, so the source must
    outlive it, and what the copy commits lands beside them without the source's catalog ever seeing it."""
    import shutil
    import sqlite3

    shutil.copytree(source, dest, dirs_exist_ok=dirs_exist_ok)
    old, new = Lake(str(source)), Lake(str(dest))
    database = Path(dest) / "_catalog" / "iceberg.sqlite"
    if database.exists():
        with sqlite3.connect(database) as db:
            for table in ("iceberg_tables", "iceberg_namespace_properties"):
                db.execute(f"UPDATE {table} SET catalog_name = ? WHERE catalog_name = ?",
                           (new.catalog_name, old.catalog_name))
    return new


def make_config(tmp_path: Path, scenario: str = "movielens", **env: str) -> Config:
    """The project config with lake and state moved under tmp_path (the data cache stays shared)."""
    environ = {
        **SMOKE_LLM,
        "REKI__PATHS__STATE_DIR": str(tmp_path / "state"),
        "REKI__PATHS__LAKE_URI": str(tmp_path / "lake"),
        "REKI__PATHS__DATA_DIR": str(PROJECT_ROOT / ".reki" / "data"),
        "REKI__SCENARIO": scenario,
        "REKI__LAKE__TABLES_IN_STORE": os.environ["REKI__LAKE__TABLES_IN_STORE"],  # false (pytest_configure)
    }
    environ.update(env)
    return load_config(PROJECT_ROOT / "conf" / "reki.yaml", environ=environ)


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
def lake(cfg: Config) -> Lake:
    return Lake(cfg.lake_uri)


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    from reki_core.datasets import movielens

    return movielens.obtain(PROJECT_ROOT / ".reki" / "data")


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str
    writer_key: str
    writer_secret: str
    reader_key: str
    reader_secret: str
    server: SeaweedFS


def serve_seaweed(state: Path, lake_bucket: str | None = None) -> Iterator[S3Server]:
    """A real SeaweedFS on a free loopback port, credentials enforced, state under `state` (and `lake_bucket` for the
    lake's tables, as `reki stack up` creates lake.bucket); stopped at the end."""
    endpoint = f"http://127.0.0.1:{free_port_block()}"
    server = SeaweedFS(state, endpoint, "reki-test", lake_bucket)
    server.start()
    creds = ensure_credentials(state)
    yield S3Server(endpoint, "reki-test", creds["writer"].access_key, creds["writer"].secret_key,
                   creds["reader"].access_key, creds["reader"].secret_key, server)
    server.stop()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> Iterator[S3Server]:
    """The session's object store (a suite whose versions must not become others' `latest` brings its own)."""
    yield from serve_seaweed(tmp_path_factory.mktemp("seaweed-state"))


@dataclass
class ConnectServer:
    url: str
    token: str
    server: SparkConnectServer

    def env(self) -> dict[str, str]:
        """What a DAG run (or a Connect client) needs to use this server: its URL, token and Airflow connection."""
        host, port = connect_endpoint(self.url)
        conn = {"conn_type": "spark_connect", "host": host, "port": port, "password": self.token}
        return {"REKI__SPARK__CONNECT_URL": self.url, CONNECT_TOKEN_ENV: self.token,
                "AIRFLOW_CONN_SPARK_CONNECT_DEFAULT": json.dumps(conn)}


def serve_spark_connect(state: Path, master: str = "local[1]", **env: str) -> Iterator[ConnectServer]:
    """A real Spark Connect server on a free loopback port, its own token, state under `state`; stopped at the end.
    It lives minutes, not days: the short-lived jobs' JVM options (tier-1 JIT, serial GC), not the warm server's."""
    url = f"sc://localhost:{free_port_block(1)}"
    short_lived = make_config(state).spark.driver_java_options
    cfg = make_config(state, REKI__SPARK__CONNECT_URL=url, REKI__SPARK__SHUFFLE_PARTITIONS="2",
                      REKI__SPARK__DRIVER_MEMORY="1g", **{"REKI__SPARK__CONNECT_JAVA_OPTIONS": short_lived, **env})
    server = SparkConnectServer(cfg, master=master)
    server.start()
    try:
        yield ConnectServer(url, ensure_connect_token(cfg.state_dir), server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def spark_connect(tmp_path_factory) -> Iterator[ConnectServer]:
    """The session's Spark Connect server (local[1]); a suite that kills its server brings its own."""
    yield from serve_spark_connect(tmp_path_factory.mktemp("spark-connect-state"))
