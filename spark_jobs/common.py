"""What every Spark job shares: its command line, reading lake partitions, writing its own `dt` partition.

Jobs run with `spark-submit spark_jobs/<job>.py --lake PATH --dt YYYY-MM-DD [--config conf/reki.yaml]`;
the same `run(spark, cfg, lake, day)` functions are called in-process by the benchmark and the tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T
from pyspark.sql.pandas.types import from_arrow_schema

from reki_core.config import Config, load_config
from reki_core.storage.lake import Lake, as_date

INTERACTIONS_SCHEMA = T.StructType(
    [
        T.StructField("user_id", T.StringType()),
        T.StructField("item_id", T.StringType()),
        T.StructField("rating", T.IntegerType()),
        T.StructField("ts", T.LongType()),
    ]
)


@dataclass(frozen=True)
class JobArgs:
    cfg: Config
    lake: Lake
    day: dt.date


def parse_args(argv: list[str] | None, description: str) -> JobArgs:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--lake", help="lake folder (default: paths.lake_uri of the config)")
    parser.add_argument("--dt", required=True, help="logical date YYYY-MM-DD")
    parser.add_argument("--config", default=None, help="config file (default conf/reki.yaml or $REKI_CONFIG)")
    ns = parser.parse_args(argv)
    cfg = load_config(ns.config)
    lake = Lake(ns.lake or cfg.lake_uri)
    lake.local_path()  # fails early, naming the lake, when it is not a local folder
    return JobArgs(cfg=cfg, lake=lake, day=as_date(ns.dt))


def run_as_job(run, step: str, argv: list[str] | None, description: str) -> int:
    """The thin main every job shares: parse arguments, start Spark, run, record the step, stop."""
    return run_as_jobs([(run, step)], argv, description)


def run_as_jobs(jobs, argv: list[str] | None, description: str) -> int:
    """Several jobs, in order, in one process; each records its own step. Spark starts (one JVM) only when a
    job needs it: a small daily run is computed in the driver (`run_step`)."""
    from reki_core.runlog import timed_step
    from reki_core.spark import get_spark

    args = parse_args(argv, description)
    sessions = []

    def spark() -> SparkSession:
        if not sessions:
            sessions.append(get_spark(args.cfg, f"reki-{jobs[0][1].replace('_', '-')}" if len(jobs) == 1 else "reki-features"))
        return sessions[0]

    for run, step in jobs:
        with timed_step(args.lake, args.day, step) as payload:
            payload.update(run_step(run, step, spark, args.cfg, args.lake, args.day))
        print(payload)
    for session in sessions:
        session.stop()
    return 0


def run_step(run, step: str, spark, cfg: Config, lake: Lake, day: dt.date) -> dict:
    """One job's day: in the driver when it is a small daily run (`spark_jobs.in_driver`), else `run` in Spark.
    `spark()` gives the session. The payload's `engine` says which ran."""
    from spark_jobs import in_driver

    try:
        payload = in_driver.run(step, cfg, lake, day)
    except Exception as exc:  # a failure of the driver's twin must not stop the day: Spark computes it, the log says why
        print(f"WARNING: {step} failed in the driver, so Spark runs it: {type(exc).__name__}: {exc}", file=sys.stderr)
        traceback.print_exc()
        return {**run(spark(), cfg, lake, day), "engine": "spark", "driver_error": f"{type(exc).__name__}: {exc}"}
    if payload is not None:
        return {**payload, "engine": "driver"}
    return {**run(spark(), cfg, lake, day), "engine": "spark"}


def previous_day(lake: Lake, dataset: str, day: dt.date) -> dt.date | None:
    """The newest partition of `dataset` strictly before `day` (a re-run of `day` never reads itself)."""
    days = [d for d in lake.partitions(dataset) if d < day]
    return days[-1] if days else None


def read_partition(spark: SparkSession, lake: Lake, dataset: str, day: dt.date) -> DataFrame:
    if not lake.has_partition(dataset, day):
        raise FileNotFoundError(f"lake partition missing: {lake.uri_of(lake.partition_path(dataset, day))}")
    return read_parquet(spark, [lake.local_path(f"{dataset}/dt={day.isoformat()}")])


def read_parquet(spark: SparkSession, folders: list[Path]) -> DataFrame:
    """The Parquet files of `folders`, with the schema of the first file's footer (read here, in the driver):
    Spark would run a job per read to infer the same schema, as it also reads only one footer."""
    first = next((f for folder in folders for f in sorted(folder.glob("*.parquet"))), None)
    if first is None:
        raise FileNotFoundError(f"no Parquet file in {folders[0]}")
    schema = from_arrow_schema(pq.read_schema(first))
    return spark.read.schema(schema).parquet(*map(str, folders))


def read_interactions(spark: SparkSession, lake: Lake, since_exclusive: dt.date | None, upto: dt.date) -> DataFrame:
    """raw/interactions partitions with since_exclusive < dt <= upto (all up to `upto` when since is None)."""
    days = [d for d in lake.partitions("raw/interactions") if d <= upto and (since_exclusive is None or d > since_exclusive)]
    if not days:
        return spark.createDataFrame([], INTERACTIONS_SCHEMA)
    df = read_parquet(spark, [lake.local_path(f"raw/interactions/dt={d.isoformat()}") for d in days])
    return df.select(
        df.user_id.cast("string"), df.item_id.cast("string"), df.rating.cast("int"), df.ts.cast("long")
    )


def write_partition(df: DataFrame, lake: Lake, dataset: str, day: dt.date) -> str:
    """Replace `dataset/dt=day` with `df`: Spark writes aside, then the folder is swapped in whole."""
    staging = f"{lake.dataset_path(dataset)}/_staging-{uuid.uuid4().hex}"
    df.write.mode("overwrite").parquet(staging)
    final = lake.partition_path(dataset, day)
    lake._swap_in(staging, final)  # the lake's own atomic swap: readers never see a half-written partition
    return final
