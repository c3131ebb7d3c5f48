"""The one SparkSession factory, shared by the Spark jobs, the benchmark and the tests.

pyspark is imported inside the function: `reki_core` modules stay importable at DAG-parse time.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from reki_core.config import Config

if TYPE_CHECKING:
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
