"""One local[1] SparkSession for every Spark test (session start costs ~10 s)."""

from __future__ import annotations

import os
import sys
import types

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")


def _shim_pandas_on_spark() -> None:
    """pyspark 4.3's pandas-on-Spark does not import under pandas 3, and `assertDataFrameEqual` imports it
    unconditionally (it only uses it for pandas inputs). Stand in placeholders so Spark-frame comparisons run."""
    try:
        import pyspark.pandas  # noqa: F401
    except ImportError:
        class _NeverAFrame:  # no object is an instance: the pandas branch is never taken
            pass

        sys.modules["pyspark.pandas"] = types.SimpleNamespace(DataFrame=_NeverAFrame)
        sys.modules["pyspark.testing.pandasutils"] = types.SimpleNamespace(PandasOnSparkTestUtils=None)


_shim_pandas_on_spark()


@pytest.fixture(scope="session")
def spark():
    from reki_core.config import PROJECT_ROOT, load_config
    from reki_core.spark import get_spark

    cfg = load_config(PROJECT_ROOT / "conf" / "reki.yaml", environ={"REKI__SPARK__SHUFFLE_PARTITIONS": "2"})
    session = get_spark(cfg, "reki-tests", master="local[1]")
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()

