"""What every Spark job shares: its command line, running jobs on a session, reading lake partitions,
writing its own `dt` partition.

The daily DAG runs the jobs as clients of the warm Spark Connect server (`run_jobs` on a Connect session;
plugins/reki_airflow/spark_connect.py). The same jobs run on a classic session too, from their thin main:
`spark-submit spark_jobs/<job>.py --dt YYYY-MM-DD [--lake PATH] [--config conf/reki.yaml]`, or as a Connect
client with `python -m spark_jobs.<job> --dt ... --remote sc://localhost:15002` (token from the environment).
"""

from __future__ import annotations

import argparse
import contextvars
import datetime as dt
import functools
import importlib
import json
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from reki_core.config import Config, load_config
from reki_core.storage.lake import (DAY_FLAGS, DAY_PROPERTY, INPUTS_PROPERTY, TOTALS_PROPERTY, Lake, as_date, lake_of,
                                    stale_day_records, table_identifier)

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
    remote: str | None


def parse_args(argv: list[str] | None, description: str) -> JobArgs:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--lake", help="a folder lake, tables included (default: the configured lake, lake_of)")
    parser.add_argument("--dt", required=True, help="logical date YYYY-MM-DD")
    parser.add_argument("--config", default=None, help="config file (default conf/reki.yaml or $REKI_CONFIG)")
    parser.add_argument("--remote", default=None, metavar="sc://HOST:PORT",
                        help="run as a client of this Spark Connect server (default: a classic session, as spark-submit)")
    ns = parser.parse_args(argv)
    cfg = load_config(ns.config)
    # --lake names a folder lake (its own catalog: a benchmark's, a test's); else the configured one.
    lake = Lake(ns.lake) if ns.lake else lake_of(cfg)
    return JobArgs(cfg=cfg, lake=lake, day=as_date(ns.dt), remote=ns.remote)


Job = tuple[Callable[..., dict], str]  # a job's run(spark, cfg, lake, day) and its run-log step


def jobs_named(names: Iterable[str]) -> list[Job]:
    """The jobs of modules `spark_jobs.<name>`, each with its run-log step: the module's `STEP` where it names one
    (`knowledge`: `llm_assign`), else `features_<name>`."""
    modules = [(name, importlib.import_module(f"spark_jobs.{name}")) for name in names]
    return [(module.run, getattr(module, "STEP", f"features_{name}")) for name, module in modules]


_CACHED: ContextVar[list[DataFrame] | None] = ContextVar("reki_job_cached_frames", default=None)


def cache(df: DataFrame) -> DataFrame:
    """`df.cache()`, unpersisted when the job that cached it ends (`releases_cache`), failed or not: the Connect server
    outlives the task, its cache is shared by all sessions, and releasing a session does not empty it."""
    df = df.cache()
    held = _CACHED.get()
    if held is not None:
        held.append(df)
    return df


def releases_cache(run: Callable[..., dict]) -> Callable[..., dict]:
    """A job's `run`: what it caches (`cache`) is unpersisted when it returns or raises."""
    @functools.wraps(run)
    def job(*args, **kwargs) -> dict:
        token = _CACHED.set([])
        try:
            return run(*args, **kwargs)
        finally:
            for frame in _CACHED.get():
                try:
                    frame.unpersist()
                except Exception:  # a server already gone holds nothing any more
                    pass
            _CACHED.reset(token)
    return job


Result = TypeVar("Result")


def at_once(spark: SparkSession, calls: list[Callable[[], Result]]) -> list[Result]:
    """The results of `calls`, run at the same time on `spark`, each in a thread of its own (the first failure is
    raised once all have ended). Each thread carries this job's context (what it caches is released with the job) and
    the session's tags: a session's tags belong to the thread that added them, and an untagged operation would escape
    the `interruptTag` that stops a killed task's work (SparkConnectJobs.on_kill)."""
    tags = sorted(spark.getTags())

    def tagged(call: Callable[[], Result]) -> Result:
        for tag in tags:
            spark.addTag(tag)
        try:
            return call()
        finally:
            for tag in tags:
                spark.removeTag(tag)

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(contextvars.copy_context().run, tagged, call) for call in calls]
        return [future.result() for future in futures]


def run_jobs(spark: SparkSession, jobs: list[Job], cfg: Config, lake: Lake, day: dt.date) -> dict[str, dict]:
    """Run `jobs` in order on `spark`, a Connect or a classic session; each records its own run-log step, so the
    summary, the gates and a failure message name the job."""
    from reki_core.runlog import timed_step

    results = {}
    for index, (run, step) in enumerate(jobs):
        try:
            with timed_step(lake, day, step) as payload:
                if index == 0:
                    check_server_reaches_store(spark, lake)
                payload.update(run(spark, cfg, lake, day))
        except Exception as exc:
            explained = store_error(exc, lake, step)
            if explained is None:
                raise
            raise explained from exc
        results[step] = payload
    return results


def check_server_reaches_store(spark: SparkSession, lake: Lake) -> None:
    """Before the jobs: the Spark server reads, as its own identity, where one of the lake's tables keeps its metadata
    (s3a's status of that file: one HEAD, retries capped). Iceberg retries a failed metadata read 20 times with a
    backoff of up to 5 s (about 90 s, and no setting of the JDBC catalog changes it), so a store that refuses the
    server's identity, or that the server cannot reach, would fail the first table read only after a minute and a
    half; here it fails in seconds, and `store_error` names the bucket and the identity. Any other answer (the
    file just replaced by a commit) leaves it to the jobs."""
    metadata = lake.any_metadata_file() if lake.store is not None else None
    if metadata is None:
        return  # a folder lake, or nothing written yet: a first write fails fast by itself (no metadata to retry)
    try:  # analysis resolves the path: no Spark job
        spark.read.format("binaryFile").load(metadata.replace("s3://", "s3a://", 1)).schema
    except Exception as exc:
        if store_failure(exc) is not None:
            raise


# What s3a's errors say when the store refuses an identity (the AWS SDK's codes, and the HTTP status of a HEAD).
_REFUSALS = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Status Code: 403", "403 Forbidden")
# And when it does not answer (a refused or timed-out connection, an unknown host).
_UNREACHABLE = ("Connection refused", "connect timed out", "Connect timed out", "UnknownHostException",
                "Unable to execute HTTP request")


def store_failure(exc: Exception) -> tuple[bool, str] | None:
    """(refused, the line saying so) when s3a's error says the store refused the Spark server's identity (refused
    true) or did not answer it (false); None for any other failure."""
    lines = [line.strip() for line in str(exc).splitlines()]
    for refused, codes in ((True, _REFUSALS), (False, _UNREACHABLE)):
        said = next((line for line in lines if any(code in line for code in codes)), None)
        if said is not None:
            return refused, said
    return None


def store_refused(exc: Exception) -> bool:
    """Whether s3a's error says the store refused the Spark server's identity: no input file is at fault then."""
    failure = store_failure(exc)
    return failure is not None and failure[0]


def store_error(exc: Exception, lake: Lake, step: str) -> Exception | None:
    """For a job the store refused or did not answer (s3a's identity and network are the Spark server's, not the
    task's): an error that says so, naming the bucket, the endpoint and where that identity comes from; None for any
    other failure."""
    from urllib.parse import urlparse

    from reki_core.storage.s3_access import ObjectStoreError

    failure = store_failure(exc) if lake.store is not None else None
    if failure is None:
        return None
    refused, said = failure
    bucket, endpoint = urlparse(lake.store.warehouse).netloc, lake.store.access.endpoint_url
    if refused:
        what = (f"refused the Spark server's identity on s3://{bucket} (the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                "of the Connect server's or the executors' environment, not this task's): give them the lake's writer "
                "identity")
    else:
        what = (f"did not answer the Spark server (s3://{bucket}; the server's `fs.s3a.endpoint`, from "
                "object_store.endpoint_url, must reach the store from where the server runs)")
    return ObjectStoreError(f"Spark job {step}: the object store at {endpoint} {what}. Store's words: {said[:300]}")


def run_as_job(run, step: str, argv: list[str] | None, description: str) -> int:
    """The thin main every job shares: parse arguments, open a session, run, record the step, stop."""
    return run_as_jobs([(run, step)], argv, description)


def run_as_jobs(jobs: list[Job], argv: list[str] | None, description: str) -> int:
    """Several jobs, in order, on one session: a classic one (spark-submit), or a Connect client with --remote."""
    from reki_core.spark import connect_client, get_spark

    args = parse_args(argv, description)
    if args.remote:
        with connect_client(args.cfg, args.remote, tag="reki-cli") as spark:
            results = run_jobs(spark, jobs, args.cfg, args.lake, args.day)
    else:
        spark = get_spark(args.cfg, "reki-" + "-".join(step.removeprefix("features_") for _, step in jobs).replace("_", "-"))
        try:
            results = run_jobs(spark, jobs, args.cfg, args.lake, args.day)
        finally:
            spark.stop()
    for payload in results.values():
        print(payload)
    return 0


def table_of(spark: SparkSession, lake: Lake, dataset: str) -> str:
    """The dataset's table name in Spark, with the lake's catalog registered on this session (runtime settings)."""
    for key, value in lake.spark_catalog_conf().items():
        spark.conf.set(key, value)
    return f"{lake.catalog_name}.{lake.table_name(dataset)}"


def previous_day(lake: Lake, dataset: str, day: dt.date) -> dt.date | None:
    """The newest partition of `dataset` strictly before `day` (a re-run of `day` never reads itself)."""
    days = [d for d in lake.partitions(dataset) if d < day]
    return days[-1] if days else None


def read_partition(spark: SparkSession, lake: Lake, dataset: str, day: dt.date,
                   only_keys: DataFrame | None = None, written_after: dt.date | None = None) -> DataFrame:
    """Day D of `dataset`; for a keyed dataset (written as changes) its state as of D: each key's rows from the newest
    day that wrote the key (`Lake.state_days`). `only_keys` (a frame of the key column) narrows a keyed read to
    those keys before the state is resolved, so a daily run reads only the users it recomputes. `written_after`
    reads only the days after it: exact for keys the caller knows were written since (their newest rows are there),
    and a scan of those few days instead of the whole state."""
    if not lake.has_partition(dataset, day):
        raise FileNotFoundError(f"lake partition missing: {lake.describe(dataset, day)}")
    table = spark.table(table_of(spark, lake, dataset))
    key = lake.key_of(dataset)
    if key is None:
        return table.where(F.col("dt") == F.lit(day)).drop("dt")
    days = lake.state_days(dataset, day)
    if written_after is not None:
        days = [d for d in days if d > written_after]
        if not days:
            return table.where(F.lit(False)).drop("dt")
    rows = table.where(F.col("dt").between(F.lit(days[0]), F.lit(days[-1])))
    if only_keys is not None:
        rows = rows.join(only_keys.select(key), key, "left_semi")
    if len(days) == 1:
        return rows.drop("dt")
    if only_keys is not None:
        # A few keys' rows: ranked by day in a window, so the table is scanned once and only those rows move.
        newest_first = Window.partitionBy(key).orderBy(F.col("dt").desc())
        state = rows.withColumn("_day_rank", F.dense_rank().over(newest_first)).where(F.col("_day_rank") == 1)
        state = state.drop("_day_rank")
    else:
        # Each key's newest day, from the narrow (key, dt) columns, then the rows of that day: an aggregate and a
        # (broadcast) semi join, where a window would shuffle and sort every wide row.
        newest = rows.select(key, "dt").groupBy(key).agg(F.max("dt").alias("dt"))
        state = rows.join(newest, [key, "dt"], "left_semi")
    flags = set(DAY_FLAGS.get(dataset, ()))  # an earlier day's flag has fallen back (Lake.read_partition)
    return state.select(*[(F.col(c) & (F.col("dt") == F.lit(day))).alias(c) if c in flags else F.col(c)
                          for c in state.columns if c != "dt"])


def totals_source(prev_day: dt.date | None, before: dict | None) -> str:
    """Where a keyed job's recorded totals came from (`totals_from` in its run record): a first day's own rows, the
    previous day's totals plus this run's changes, or an aggregate of the state (the previous day recorded none)."""
    if prev_day is None:
        return "this run's rows"
    return "previous day" if before is not None else "aggregate"


def read_day_changes(spark: SparkSession, lake: Lake, dataset: str, day: dt.date,
                     since_exclusive: dt.date | None = None) -> DataFrame:
    """The rows as stored on day D (a keyed dataset's changes of that day), or on every day since_exclusive < dt <= D."""
    lower = F.col("dt") == F.lit(day) if since_exclusive is None else F.col("dt") > F.lit(since_exclusive)
    return spark.table(table_of(spark, lake, dataset)).where(lower & (F.col("dt") <= F.lit(day))).drop("dt")


def empty_frame(spark: SparkSession, schema: T.StructType) -> DataFrame:
    """No rows, of `schema`, made in the JVM: a classic `createDataFrame([])` runs Python workers (about a second), and
    the planner, not knowing its size, would never broadcast it, so a join with it shuffles the other side whole."""
    return spark.range(0).select(*[F.lit(None).cast(field.dataType).alias(field.name) for field in schema.fields])


def values_frame(spark: SparkSession, column: str, values: Iterable[str]) -> DataFrame:
    """One string column of `values` (a few ids the driver found), made in the JVM like `empty_frame`, and for the same
    reasons: cheap, and small to the planner, so that a join broadcasts it."""
    literals = F.array(*[F.lit(str(value)) for value in values]).cast("array<string>")
    return spark.range(1).select(F.explode(literals).alias(column))


def read_interactions(spark: SparkSession, lake: Lake, since_exclusive: dt.date | None, upto: dt.date) -> DataFrame:
    """raw/interactions partitions with since_exclusive < dt <= upto (all up to `upto` when since is None)."""
    days = [d for d in lake.partitions("raw/interactions") if d <= upto and (since_exclusive is None or d > since_exclusive)]
    if not days:
        return empty_frame(spark, INTERACTIONS_SCHEMA)
    df = spark.table(table_of(spark, lake, "raw/interactions")).where(F.col("dt") <= F.lit(upto))
    if since_exclusive is not None:
        df = df.where(F.col("dt") > F.lit(since_exclusive))
    return df.select(
        df.user_id.cast("string"), df.item_id.cast("string"), df.rating.cast("int"), df.ts.cast("long")
    )


# The row order each keyed dataset is written in, by its job and by `consolidate_state` (readers that stream a day
# get it in this order).
STATE_ORDER = {"features/user_history": ("user_id",), "features/knowledge_versions": ("user_id", "window_n"),
               "features/ctr_samples": ("user_id", "ts", "item_id")}


def write_days(df: DataFrame, lake: Lake, dataset: str, days: list[dt.date]) -> str:
    """Replace days `days` of `dataset` with the rows of `df` (its `dt` column gives each row's day, one of `days`) in
    one Iceberg commit, then record the days (one more commit): `write_partition` for several days at once (a first
    load's history). A day of `days` without rows is written empty. Not for keyed datasets."""
    if lake.key_of(dataset) is not None or not lake.is_table(dataset):
        raise ValueError(f"{dataset}: write_days writes whole days of a table dataset that is not keyed")
    spark = df.sparkSession
    name = table_of(spark, lake, dataset)
    rows = df.withColumn("dt", F.col("dt").cast("date"))
    _create_table(spark, lake, dataset, name, rows.schema)
    rows.writeTo(name).option("mergeSchema", "true").option("distribution-mode", "none").overwrite(
        F.col("dt").isin(list(days)))
    recorded = ", ".join(f"'{DAY_PROPERTY}{day.isoformat()}' = '{lake.day_kind(dataset, False)}'" for day in days)
    spark.sql(f"ALTER TABLE {name} SET TBLPROPERTIES ({recorded})")
    return f"{name}/dt={days[0].isoformat()}..{days[-1].isoformat()}"


def _create_table(spark: SparkSession, lake: Lake, dataset: str, name: str, schema: T.StructType) -> None:
    """The dataset's table, partitioned by `dt`, unless it exists."""
    if spark.catalog.tableExists(name):
        return
    lake.catalog.create_namespace_if_not_exists(table_identifier(dataset)[0])
    try:  # never createOrReplace: a table another writer just created keeps its rows
        # From the schema alone: an action on `rows` would spend the job's observed metrics.
        writer = spark.createDataFrame([], schema).writeTo(name).using("iceberg").partitionedBy(
            F.col("dt")).tableProperty("write.spark.accept-any-schema", "true")
        for key, value in lake.table_properties.items():
            writer = writer.tableProperty(key, value)
        writer.create()
    except Exception as exc:
        if "already exists" not in str(exc).lower():
            raise


def write_partition(df: DataFrame, lake: Lake, dataset: str, day: dt.date, changes_only: bool = False,
                    totals: Callable[[], dict] | None = None, totals_read_the_day: bool = False,
                    inputs: str | None = None, unchanged_since: int | None = None) -> str:
    """Replace day `day` of `dataset` with `df`: one Iceberg commit (an overwrite of exactly that day, so a re-run that
    writes fewer rows, or none, leaves none of the old ones), then the day is recorded (a table property; without it
    an empty day would look unwritten), as the whole state or, for a keyed dataset, its changes. A crash between the
    two leaves the day unrecorded, so the next run redoes it. `totals`, called once the rows are committed, gives the
    state's totals as of the day (`TOTALS_PROPERTY`), recorded with the day in the same commit; with
    `totals_read_the_day` (an aggregate that reads the state as of the day) it is called once the day is recorded, and
    recorded in a commit of its own. `inputs`, the fingerprint of what the rows were
    computed from, is recorded with the day (`INPUTS_PROPERTY`). What an earlier write of the day recorded about its rows
    (`DAY_RECORDS`) is removed before they are replaced, so a crash in between leaves none rather than stale ones.
    `unchanged_since`, a snapshot id the rows were read at: the commit fails (Iceberg's serializable validation) if
    another writer added rows to the day after it, instead of replacing them with rows computed before them."""
    if not lake.is_table(dataset):
        raise ValueError(f"{dataset} is not a table of the lake")
    kind = lake.day_kind(dataset, changes_only)
    spark = df.sparkSession
    name = table_of(spark, lake, dataset)
    rows = df.withColumn("dt", F.lit(day).cast("date"))
    _create_table(spark, lake, dataset, name, rows.schema)
    table = lake.load_table(dataset)
    stale = stale_day_records(table.properties, day) if table is not None else []
    if stale:  # they describe the rows about to be replaced
        spark.sql(f"ALTER TABLE {name} UNSET TBLPROPERTIES ({', '.join(repr(key) for key in stale)})")
    # distribution-mode none: the job laid its rows out already; Iceberg's default (hash by partition) would shuffle
    # the whole day again into the one task of its single `dt` value.
    writer = rows.writeTo(name).option("mergeSchema", "true").option("distribution-mode", "none")
    if unchanged_since is not None:
        writer = writer.option("isolation-level", "serializable").option("validate-from-snapshot-id", str(unchanged_since))
    writer.overwrite(F.col("dt") == F.lit(day).cast("date"))
    recorded = {f"{DAY_PROPERTY}{day.isoformat()}": kind}
    if inputs is not None:  # hex digits: nothing to escape
        recorded[f"{INPUTS_PROPERTY}{day.isoformat()}"] = inputs
    totals_key = f"{TOTALS_PROPERTY}{day.isoformat()}"
    if totals is not None and not totals_read_the_day:  # numbers and plain keys: no quote to escape
        recorded[totals_key] = json.dumps(totals(), sort_keys=True)
    spark.sql(f"ALTER TABLE {name} SET TBLPROPERTIES ({', '.join(f'{k!r} = {v!r}' for k, v in recorded.items())})")
    if totals is not None and totals_read_the_day:  # after the day's record: the aggregate reads the day
        spark.sql(f"ALTER TABLE {name} SET TBLPROPERTIES ('{totals_key}' = '{json.dumps(totals(), sort_keys=True)}')")
    return f"{name}/dt={day.isoformat()}"


def consolidate_state(spark: SparkSession, lake: Lake, dataset: str, max_change_days: int) -> dict | None:
    """Rewrite the newest day of a keyed dataset as a full day (each key's rows as of that day, its day flags resolved,
    its totals kept) once its state spans more than `max_change_days` days of changes: a later run's read of the
    state then scans that one day, not every day since the last full one (a heavy user's rows are stored again on each
    day the user was active). What the state reads as of any day is unchanged. A write of that day by another run
    between the read and the commit fails this one (`unchanged_since`); None when the chain is short enough."""
    key = lake.key_of(dataset)
    table = lake.load_table(dataset)  # once: the days, the chain and the snapshot checked at the commit agree
    written = lake.day_kinds(dataset, table) if key is not None and table is not None else {}
    if not written:
        return None
    newest = max(written)
    chain = lake.state_days(dataset, newest, table)
    if len(chain) - 1 <= max_change_days:
        return None
    read_at = table.current_snapshot().snapshot_id
    totals = lake.state_totals(dataset, newest)
    state = read_partition(spark, lake, dataset, newest).localCheckpoint()  # read before the day is replaced
    state = state.repartition(key).sortWithinPartitions(*STATE_ORDER[dataset])
    write_partition(state, lake, dataset, newest, totals=(lambda: totals) if totals is not None else None,
                    unchanged_since=read_at)
    return {"dataset": dataset, "day": newest.isoformat(), "change_days": len(chain) - 1, "since": chain[0].isoformat()}
