"""One local[1] SparkSession for every Spark test (session start costs ~10 s)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")


@pytest.fixture(scope="session")
def spark():
    from reki_core.config import PROJECT_ROOT, load_config
    from reki_core.spark import get_spark

    cfg = load_config(PROJECT_ROOT / "conf" / "reki.yaml", environ={"REKI__SPARK__SHUFFLE_PARTITIONS": "2"})
    # Short-lived, as a spark-submitted job: the same tier-1 JIT and serial GC (conf/reki.yaml says why).
    session = get_spark(cfg, "reki-tests", master="local[1]", java_options=cfg.spark.driver_java_options)
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()

